"""KVQuant as a cache format (issue 19, PAPERS.md §5): pre-RoPE per-channel keys, per-token
values, dense-and-sparse outliers in a side table, fp attention sinks; against dense attention
over the rotated keys at 8 bits, the exactness of outliers and sinks, the paper's pre- vs
post-RoPE motivation, and the byte formula and buffers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.cache import CacheConfig, KVCache, KVQuantCache, dense_cache
from jaxattn.masks import Causal
from jaxattn.ops.kv_quant import fit_codebook, normalize
from jaxattn.ops.rope import RopeConfig, apply_rope

B, N, K, H, T, C, PREFILL = 2, 4, 2, 16, 29, 32, 9
ROPE = RopeConfig()
KVQ = dict(format="kvquant", group_size=4, residual=8)


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, n, H), np.float32) for n in (N, K, K))
    k[..., 3] += 4.0  # an outlier channel (pre-RoPE: a fixed offset, as in the paper's Fig. 2)
    return q, k, v


def _kvq(dtype=jnp.float32, **fields):
    cfg = CacheConfig(**{**KVQ, **fields})
    return dense_cache(batch=B, capacity=C, num_kv_heads=K, head_dim=H, dtype=dtype, config=cfg)


@jax.jit
def _run(cache, q, k, v):
    """Prefill PREFILL tokens, then one per step: outputs [B, T, N, H] and the cache. Queries
    are rotated here, keys are handed over pre-RoPE with the rope (as the layer does)."""
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    q = apply_rope(q, pos, ROPE)
    o0, cache = cache.update_and_attend(
        q[:, :PREFILL], k[:, :PREFILL], v[:, :PREFILL], mask=Causal(), rope=ROPE
    )

    def step(cache, x):
        o, cache = cache.update_and_attend(*(a[:, None] for a in x), mask=Causal(), rope=ROPE)
        return cache, o[:, 0]

    xs = tuple(jnp.swapaxes(a[:, PREFILL:], 0, 1) for a in (q, k, v))
    cache, rest = jax.lax.scan(step, cache, xs)
    return jnp.concatenate([o0, jnp.swapaxes(rest, 0, 1)], 1), cache


@jax.jit
def _dense(q, k, v):
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cache = KVCache.create(batch=B, capacity=C, num_kv_heads=K, head_dim=H, dtype=jnp.float32)
    o, _ = cache.update_and_attend(
        apply_rope(q, pos, ROPE), apply_rope(k, pos, ROPE), v, mask=Causal()
    )
    return o


@functools.partial(jax.jit, static_argnums=1)
def _stored(cache, name):
    """Every slot's stored pre-RoPE key (name "k") or value ("v") as attention reads it
    (outliers and sinks restored, no rotation), [B, C, K, H]."""
    slots = jnp.broadcast_to(jnp.arange(cache.capacity), (B, cache.capacity))
    rows = getattr(cache, name).dequant_slots(0, cache.capacity)
    return cache._restore(name, None)(rows, slots, slots)


def _stored_keys(cache):
    return _stored(cache, "k")


@pytest.mark.parametrize("outliers,fp_sinks", [(0.0, 0), (0.1, 2)])
def test_8_bits_is_dense_attention_over_the_rotated_keys(outliers, fp_sinks):
    q, k, v = _qkv(0)
    o, cache = _run(_kvq(bits=8, outliers=outliers, fp_sinks=fp_sinks), q, k, v)
    assert isinstance(cache, KVQuantCache) and cache.fp_sinks == fp_sinks
    assert cache.k_val_BCKO.shape[-1] == math.ceil(outliers * H)
    o_ref = _dense(q, k, v)
    err = float(jnp.max(jnp.abs(o - o_ref)))
    # 8-bit codes over ranges of a few units: errors of ~1e-2 at most; and not exact (the codes
    # are used: T - R tokens are quantized)
    assert 1e-6 < err < 2e-2, err
    np.testing.assert_array_equal(cache.lengths_B, [T, T])


def test_outliers_and_sinks_come_back_exactly_and_lower_the_error():
    q, k, v = _qkv(1)
    k[:, 5, 0, 7] = 60.0  # a single huge entry: kept in the side table
    v[:, 11, 1, 2] = -45.0
    _, cache = _run(_kvq(bits=3, outliers=0.125, fp_sinks=2), q, k, v)
    got = np.asarray(_stored_keys(cache))[:, :T]
    # the two largest |k| of each vector, the sink tokens: exact
    top = np.argsort(-np.abs(k), axis=-1)[..., :2]
    np.testing.assert_array_equal(np.take_along_axis(got, top, -1), np.take_along_axis(k, top, -1))
    np.testing.assert_array_equal(got[:, :2], k[:, :2])
    vals = np.asarray(_stored(cache, "v"))
    assert vals[0, 11, 1, 2] == vals[1, 11, 1, 2] == -45.0
    # without the side table the huge entry widens its channel's range over its group of 4
    # tokens (positions 4..7): the other three are rounded to steps of 60 / 7
    _, plain = _run(_kvq(bits=3, outliers=0.0, fp_sinks=2), q, k, v)
    grp = [4, 6, 7]
    err = lambda c: np.abs(np.asarray(_stored_keys(c))[:, grp, 0, 7] - k[:, grp, 0, 7]).max()  # noqa: E731
    assert err(cache) < 0.1 * err(plain), (err(cache), err(plain))
    quant = slice(2, T - 8)  # tokens read from their codes (past the sinks, before the window)
    mean = lambda c: np.abs(np.asarray(_stored_keys(c))[:, quant] - k[:, quant]).mean()  # noqa: E731
    assert mean(cache) < mean(plain)


@jax.jit
def _pre_and_post_rope_errors(k):
    """The error norms of 2-bit KVQuant over pre-RoPE keys and of KIVI over the rotated ones,
    both measured after RoPE (one compile)."""
    pos = jnp.arange(64)[None]
    post = apply_rope(k, pos, ROPE)
    kw = dict(batch=1, capacity=64, num_kv_heads=1, head_dim=H, dtype=jnp.float32)
    fields = dict(bits=2, group_size=16, residual=16)
    pre = dense_cache(
        config=CacheConfig(format="kvquant", outliers=0.0, fp_sinks=0, **fields), **kw
    )
    kivi = dense_cache(config=CacheConfig(format="kivi", **fields), **kw)
    pre = pre.write(k, k).advance(64)
    kivi = kivi.write(post, post).advance(64)
    # RoPE is orthogonal per channel pair: the error norm is the same measured before or after
    err_pre = jnp.linalg.norm(
        apply_rope(pre.k.dequant_slots(0, 48), pos[:, :48], ROPE) - post[:, :48]
    )
    err_post = jnp.linalg.norm(kivi.k.dequant_slots(0, 48) - post[:, :48])
    return err_pre, err_post


def test_pre_rope_keys_quantize_better_than_post_rope_keys_with_outlier_channels():
    # the paper's motivation: an outlier channel has a fixed offset before RoPE; after RoPE it
    # rotates with the position into its pair, so per-channel ranges over a group widen
    rng = np.random.default_rng(2)
    k = rng.standard_normal((1, 64, 1, H), np.float32)
    k[..., 0] += 8.0
    k[..., 6] -= 6.0
    err_pre, err_post = _pre_and_post_rope_errors(k)
    assert float(err_pre) < 0.7 * float(err_post), (float(err_pre), float(err_post))


def test_bytes_per_token_is_the_formula_and_the_buffers():
    cfg = CacheConfig(format="kvquant", bits=4, group_size=32, residual=128, outliers=0.01)
    kh, h, ctx = 8, 128, 32768
    cache = jax.eval_shape(
        lambda: dense_cache(
            batch=1, capacity=ctx, num_kv_heads=kh, head_dim=h, dtype=jnp.bfloat16, config=cfg
        )  # fmt: skip
    )
    # 4-bit codes; keys: fp16 scale + zero per channel per 32 tokens, values: per 32 channels;
    # ceil(0.01 * 128) = 2 outliers per vector: a bf16 value and a uint8 index each
    codes = 2 * kh * h * 4 / 8
    stats = kh * h * 2 * 2 / 32 + kh * (h / 32) * 2 * 2
    outl = 2 * kh * 2 * (2 + 1)
    assert cache.bytes_per_token() == codes + stats + outl
    fixed = 128 * 2 * kh * h * 2 + 1 * 2 * kh * h * 2  # the two windows, one bf16 sink token
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) - 4  # minus lengths
    assert total == (codes + stats + outl) * ctx + fixed
    assert cache.bytes_per_token(ctx) == total / ctx
    # 1392.1 bytes: about 0.34 of the bf16 cache's 4096 at 32K
    assert 0.33 < cache.bytes_per_token(ctx) / (2 * kh * h * 2) < 0.35


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"outliers=0.7 must be a fraction"):
        CacheConfig(format="kvquant", outliers=0.7)
    with pytest.raises(ValueError, match=r"fp_sinks=-1 must be >= 0"):
        CacheConfig(format="kvquant", fp_sinks=-1)
    with pytest.raises(ValueError, match=r"outliers=0.1 applies to format='kvquant' only"):
        CacheConfig(format="kivi", outliers=0.1)
    with pytest.raises(ValueError, match=r"important=4 applies to format='mikv' only"):
        CacheConfig(format="kvquant", important=4)
    with pytest.raises(ValueError, match=r"keeps every token .*policy='sink_window' must be"):
        CacheConfig(format="kvquant", policy="sink_window", sink=0, window=64)
    with pytest.raises(ValueError, match=r"group_size=32 must divide .*residual=48"):
        CacheConfig(format="kvquant", residual=48)
    assert CacheConfig(format="kvquant").to_dict()["fp_sinks"] == 1


# -- non-uniform datatypes (nuqX) --------------------------------------------------------------


def test_kmeans_codebook_recovers_a_known_discrete_distribution():
    rng = np.random.default_rng(3)
    atoms = np.array([0.0, 0.1, 0.35, 0.4, 0.6, 0.8, 0.9, 1.0])
    u = rng.choice(atoms, size=20000, p=[0.05, 0.2, 0.1, 0.2, 0.05, 0.1, 0.2, 0.1])
    u = u + rng.normal(0, 0.003, u.shape)
    np.testing.assert_allclose(fit_codebook(u, 3), atoms, atol=2e-3)
    # sensitivity weights (Fisher information in the paper) choose which values the levels
    # serve: with no weight on 0.2 and 0.6, the four levels are the four weighted atoms
    atoms = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    u = np.repeat(atoms, 500)
    w = np.repeat([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], 500)
    np.testing.assert_allclose(fit_codebook(u, 2, w), [0.0, 0.4, 0.8, 1.0], atol=1e-5)
    assert not np.allclose(fit_codebook(u, 2), [0.0, 0.4, 0.8, 1.0], atol=1e-2)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        fit_codebook(u, 2, -w)


def test_nuq_with_a_fine_codebook_is_dense_and_fitted_levels_beat_uniform_codes():
    q, k, v = _qkv(4)
    fine = tuple(np.linspace(0, 1, 256).tolist())
    o, cache = _run(_kvq(bits=8, datatype="nuq", codebook=(fine, fine)), q, k, v)
    assert cache.k.levels_L.shape == (256,)
    assert float(jnp.max(jnp.abs(o - _dense(q, k, v)))) < 2e-2
    # 3 bits in groups of 16 (per channel over 16 tokens / per token over 16 channels), the
    # codebooks fitted on a calibration draw and tested on another: normalised values of a
    # Gaussian bunch in the middle of each group's range, where k-means puts more levels
    rng = np.random.default_rng(5)
    k_cal, v_cal = (rng.standard_normal((1, 2048, 1, H), np.float32) for _ in range(2))
    k_t, v_t = (rng.standard_normal((8, 64, 1, H), np.float32) for _ in range(2))
    fit = jax.jit(lambda x, axis: fit_codebook(normalize(x, axis), 3), static_argnums=1)
    books = tuple(
        tuple(np.asarray(fit(x, axis)).tolist())
        for x, axis in ((k_cal.reshape(1, 128, 16, 1, H), 2), (v_cal, -1))
    )
    kw = dict(batch=8, capacity=64, num_kv_heads=1, head_dim=H, dtype=jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def dequantized(cfg, k_t, v_t):
        c = dense_cache(config=cfg, **kw).write(k_t, v_t).advance(64)
        return c.k.dequant_slots(0, 64), c.v.dequant_slots(0, 64)

    def errors(**fields):
        cfg = CacheConfig(format="kvquant", bits=3, group_size=16, residual=16, outliers=0.0,
                          fp_sinks=0, **fields)  # fmt: skip
        k_d, v_d = (np.asarray(x) for x in dequantized(cfg, k_t, v_t))
        ek = np.mean((k_d - k_t) ** 2)  # all 64 quantized
        ev = np.mean((v_d[:, :48] - v_t[:, :48]) ** 2)
        return ek, ev

    nuq, uniform = errors(datatype="nuq", codebook=books), errors()
    assert nuq[0] < 0.97 * uniform[0] and nuq[1] < 0.97 * uniform[1], (nuq, uniform)


def test_nuq_bytes_count_the_codebooks_and_calibration_is_required():
    book = tuple(np.linspace(0, 1, 16).tolist())
    cfg = CacheConfig(format="kvquant", datatype="nuq", codebook=[list(book), list(book)])
    assert cfg.codebook == (book, book)  # JSON lists back to tuples: hashable
    kw = dict(batch=1, capacity=256, num_kv_heads=2, head_dim=32, dtype=jnp.bfloat16)
    nuq = jax.eval_shape(lambda: dense_cache(config=cfg, **kw))
    uni = jax.eval_shape(lambda: dense_cache(config=CacheConfig(format="kvquant"), **kw))
    assert nuq.bytes_per_token() == uni.bytes_per_token()  # amortised to nothing
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nuq)) - 4
    assert total == uni.bytes_per_token(256) * 256 + 2 * 16 * 4  # two fp32 codebooks of 16
    assert nuq.bytes_per_token(256) == total / 256
    with pytest.raises(ValueError, match=r"CacheConfig.codebook is required for datatype='nuq'"):
        CacheConfig(format="kvquant", datatype="nuq")
    with pytest.raises(ValueError, match=r"codebook must be .* of 2\^bits=16 floats"):
        CacheConfig(format="kvquant", datatype="nuq", codebook=(book, book[:8]))
    with pytest.raises(ValueError, match=r"sorted floats in \[0, 1\]"):
        CacheConfig(format="kvquant", datatype="nuq", codebook=(book, book[::-1]))
    with pytest.raises(ValueError, match=r"datatype='fp4' must be one of"):
        CacheConfig(format="kvquant", datatype="fp4")


@pytest.mark.parametrize("batch", [1, 3])
def test_nuq_bytes_per_token_is_exact_for_a_batch_sharing_one_codebook(batch):
    # the codebooks are one buffer for the batch: each sequence counts its 1/B share, so
    # B sequences' bytes are every buffer of the cache (the old count gave B codebooks)
    book = tuple(np.linspace(0, 1, 16).tolist())
    cfg = CacheConfig(format="kvquant", datatype="nuq", codebook=(book, book))
    kw = dict(capacity=256, num_kv_heads=2, head_dim=32, dtype=jnp.bfloat16, config=cfg)
    cache = jax.eval_shape(lambda: dense_cache(batch=batch, **kw))
    assert cache.k.levels_L.shape == (16,)  # one codebook, not one per sequence
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) - 4 * batch
    assert batch * 256 * cache.bytes_per_token(256) == pytest.approx(total, rel=1e-12)
    one = jax.eval_shape(lambda: dense_cache(batch=1, **kw))
    share = (1 - 1 / batch) * 2 * 16 * 4 / 256  # the codebooks' bytes not counted again
    assert cache.bytes_per_token(256) == pytest.approx(one.bytes_per_token(256) - share)
    assert cache.bytes_per_token() == one.bytes_per_token()  # the long-context limit


def test_the_layer_hands_pre_rope_keys_to_the_cache_and_other_qk_transforms_are_refused():
    from flax import nnx

    from jaxattn.layers import Attention, AttentionConfig

    cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, rope=ROPE)
    layer = nnx.jit(lambda: Attention(cfg, rngs=nnx.Rngs(0)))()  # one compile, not op by op
    x = jax.random.normal(jax.random.key(0), (2, 20, 32))
    fields = dict(format="kvquant", bits=8, group_size=4, residual=8, fp_sinks=1)
    cache = layer.init_cache(2, 24, jnp.float32, cache=fields)
    assert isinstance(cache, KVQuantCache)
    decode = nnx.jit(lambda layer, x, cache: layer.decode(x, cache))  # two compiles
    y0, cache = decode(layer, x[:, :7], cache)
    ys = [y0]
    for t in range(7, 20):
        y, cache = decode(layer, x[:, t : t + 1], cache)
        ys.append(y)
    full = nnx.jit(lambda layer, x: layer(x))(layer, x)
    err = float(jnp.max(jnp.abs(jnp.concatenate(ys, 1) - full)))
    assert 0 < err < 0.02 * float(jnp.std(full)), err
    # the stored keys are the pre-RoPE projections (up to the 8-bit codes)
    k_pre = nnx.jit(lambda layer, x: layer.k(x))(layer, x)
    np.testing.assert_allclose(_stored_keys(cache)[:, :12], k_pre[:, :12], atol=0.05)

    class Rotated(Attention):
        def qk_transform(self, q, kv, ctx):
            return super().qk_transform(q, kv, ctx)

    with pytest.raises(ValueError, match=r"cache.format='kvquant' stores pre-RoPE keys"):
        nnx.eval_shape(lambda: Rotated(cfg, rngs=nnx.Rngs(0))).init_cache(2, 24, cache=fields)
