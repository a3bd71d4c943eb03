"""Quantized cache formats (issue 19): KIVI's equations, packing, the stored state against a
numpy KIVI reference, decode against dequantize-then-attend, byte accounting, bad input.

The numpy reference below is written from KIVI's equations (PAPERS.md §5; jaxattn.ops.kv_quant):
(1) z = min X, s = (max X - min X) / (2^b - 1); (2) Q = round((X - z) / s) in [0, 2^b - 1];
(3) X' = Q·s + z. Keys: a group is one channel over G consecutive tokens, quantized R tokens at
a time; values: one token over G consecutive channels, quantized when it leaves the last R.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.cache import (
    CacheConfig,
    KVCache,
    QuantizedKVCache,
    QuantizedLatentCache,
    dense_cache,
    latent_cache,
)
from jaxattn.masks import Causal
from jaxattn.ops import kv_quant
from jaxattn.ops.attention_decode import DecodeBlockSizes

F16 = np.float16


def _normal(seed, shape):
    """Standard normal test data from numpy (jax.random would compile a sampler per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _np_quant(x, bits, axis):
    """KIVI (1)-(3) in numpy, scales and zeros stored in fp16 (z rounded down, s up)."""
    x = x.astype(np.float32)
    lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    z = lo.astype(F16)
    z = np.where(z.astype(np.float32) > lo, np.nextafter(z, F16(-np.inf)), z)
    s32 = (hi - z.astype(np.float32)) / np.float32(2**bits - 1)
    s = s32.astype(F16)
    s = np.where(s.astype(np.float32) < s32, np.nextafter(s, F16(np.inf)), s)
    zf, sf = z.astype(np.float32), s.astype(np.float32)
    inv = np.where(sf > 0, np.float32(1) / np.where(sf > 0, sf, 1), 0).astype(np.float32)
    codes = np.clip(np.round((x - zf) * inv), 0, 2**bits - 1)
    return codes, sf, zf, codes * sf + zf


def _np_kivi(k_TKH, v_TKV, bits, g):
    """Every complete key group and every value token quantized: (k', v') in fp32."""
    t, kh, h = k_TKH.shape
    full = t // g * g
    kq = k_TKH.astype(np.float32).copy()
    kq[:full] = _np_quant(k_TKH[:full].reshape(t // g, g, kh, h), bits, 1)[3].reshape(full, kh, h)
    vq = None
    if v_TKV is not None:
        tv, kv, vd = v_TKV.shape
        vq = _np_quant(v_TKV.reshape(tv, kv, vd // g, g), bits, -1)[3].reshape(tv, kv, vd)
    return kq, vq


def _np_attend(q_TNH, k_SKH, v_SKV, qpos, kpos, *, sink=0, window=0):
    """Softmax attention of queries at ``qpos`` over keys at ``kpos`` (causal, ring policy)."""
    n, kh = q_TNH.shape[1], k_SKH.shape[1]
    kv = v_SKV.shape[1]
    s = np.einsum("tnh,snh->nts", q_TNH, np.repeat(k_SKH, n // kh, 1)) / np.sqrt(q_TNH.shape[-1])
    vis = kpos[None, :] <= qpos[:, None]
    if window:
        vis &= (kpos[None, :] < sink) | (qpos[:, None] - kpos[None, :] < window)
    s = np.where(vis[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nts,snv->tnv", p, np.repeat(v_SKV, n // kv, 1))


def test_pack_unpack_round_trips_in_uint8_and_uint32_words():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 5, 37), np.int32))
    words_of = {2: (jnp.uint8, 4), 3: (jnp.uint32, 10), 4: (jnp.uint8, 2), 8: (jnp.uint8, 1)}

    @jax.jit  # one program for every width (eager, each pack / unpack op compiles alone)
    def round_trips(x):
        codes = {b: x % (1 << b) for b in words_of}
        words = {b: kv_quant.pack_codes(c, b) for b, c in codes.items()}
        return codes, words, {b: kv_quant.unpack_codes(w, b, 37) for b, w in words.items()}

    codes, words, back = round_trips(x)
    for bits, (word, per) in words_of.items():
        assert words[bits].dtype == word and words[bits].shape == (3, 5, -(-37 // per))
        np.testing.assert_array_equal(back[bits], codes[bits])
    with pytest.raises(ValueError, match=r"bits=5 must be one of \(2, 3, 4, 8\)"):
        kv_quant.word_dtype(5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kivi_equations_codes_and_error_bound_scale_over_2(bits):
    x = np.asarray(_normal(bits, (6, 4, 32)) * 3)
    codes, scale, zero = kv_quant.quantize(x, bits, axes=-1)
    want_codes, want_s, want_z, want_x = _np_quant(x, bits, -1)
    assert codes.dtype == kv_quant.word_dtype(bits) and scale.dtype == jnp.float16
    assert scale.shape == zero.shape == (6, 4, 1)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scale.astype(np.float32), want_s)
    got = kv_quant.dequantize(codes, scale, zero)
    np.testing.assert_allclose(got, want_x, rtol=0, atol=1e-6)
    assert np.all(np.abs(got - x) <= want_s / 2 * (1 + 1e-5) + 1e-7)  # |X - X'| <= s/2


B, N, K, H = 2, 4, 2, 8


def _qkv(t, seed=0, kv_dim=H):
    return (
        _normal((seed, 0), (B, t, N, H)),
        _normal((seed, 1), (B, t, K, H)) * np.linspace(0.5, 4, H, dtype=np.float32),  # outliers
        _normal((seed, 2), (B, t, K, kv_dim)),
    )


@jax.jit
def _run(cache, q, k, v):
    """Prefill 11 tokens, then one per step (a scan); outputs [B, T, N, V] and the cache."""
    o0, cache = cache.update_and_attend(q[:, :11], k[:, :11], v[:, :11], mask=Causal())

    def step(cache, x):
        o, cache = cache.update_and_attend(*(a[:, None] for a in x), mask=Causal())
        return cache, o[:, 0]

    xs = tuple(jnp.swapaxes(a[:, 11:], 0, 1) for a in (q, k, v))
    cache, rest = jax.lax.scan(step, cache, xs)
    return jnp.concatenate([o0, jnp.swapaxes(rest, 0, 1)], 1), cache


def _reference(q, k, v, cfg, *, prefill=11):
    """Dequantize-then-attend from the numpy KIVI state before each step."""
    g, r, bits = cfg.group_size, cfg.residual, cfg.bits
    sink, window = (cfg.sink, cfg.window) if cfg.policy == "sink_window" else (0, 0)
    q, k, v = (np.asarray(a, np.float32) for a in (q, k, v))
    t = q.shape[1]
    out = np.zeros((B, t, N, v.shape[-1]), np.float32)
    for b in range(B):
        kq, vq = _np_kivi(k[b], v[b], bits, g)
        chunks = [(0, prefill)] + [(i, i + 1) for i in range(prefill, t)]
        for lo, hi in chunks:
            qk, qv = lo // r * r, max(lo - r, 0)  # Q_k(n), Q_v(n) after n = lo tokens
            kk = np.concatenate([kq[:qk], k[b, qk:hi]])
            vv = np.concatenate([vq[:qv], v[b, qv:hi]])
            pos = np.arange(hi)
            out[b, lo:hi] = _np_attend(
                q[b, lo:hi], kk, vv, pos[lo:hi], pos, sink=sink, window=window
            )
    return out


KIVI = dict(format="kivi", group_size=4, residual=8)
# the full case: one value group per row (G = H), the setting the RotateKV test below also runs,
# so _run compiles once for both; the ring case covers several value groups per row (G < H)
FULL_2BIT = CacheConfig(format="kivi", group_size=8, residual=8, bits=2)


def _full_cache():
    return dense_cache(
        batch=B, capacity=40, num_kv_heads=K, head_dim=H, dtype=jnp.float32, config=FULL_2BIT
    )


@pytest.mark.parametrize(
    "cfg",
    [FULL_2BIT, CacheConfig(**KIVI, bits=3, policy="sink_window", sink=4, window=12)],
    ids=["full_2bit_g8", "ring_3bit_g4_sink4_window12"],
)
def test_decode_equals_dequantize_then_attend_on_the_kivi_reference(cfg):
    q, k, v = _qkv(37)
    cache = dense_cache(
        batch=B, capacity=40, num_kv_heads=K, head_dim=H, dtype=jnp.float32, config=cfg
    )
    assert isinstance(cache, QuantizedKVCache)
    o, cache = _run(cache, q, k, v)
    np.testing.assert_allclose(o, _reference(q, k, v, cfg), atol=2e-5)
    assert cache.lengths_B.tolist() == [37, 37]


def test_stored_state_matches_numpy_kivi_and_does_not_depend_on_the_writes():
    q, k, v = _qkv(37, seed=3)
    # one write of 37 tokens against a prefill of 11 and 26 one-token steps (_run, compiled
    # once for the decode test above: update_and_attend stores through the same path)
    write_all = jax.jit(
        lambda cache: (c := cache.write(k, v).advance(37), c.k.dequant_slots(0, 40),
                       c.v.dequant_slots(0, 40))
    )  # fmt: skip
    one, k_deq, v_deq = write_all(_full_cache())
    _, many = _run(_full_cache(), q, k, v)
    jax.tree.map(np.testing.assert_array_equal, one, many)
    # statistics per channel (over 8-token groups) for keys, per token for values
    assert one.k.scale_BGKX.shape == (B, 40 // 8, K, H)
    assert one.v.scale_BGKX.shape == (B, 40, K, H // 8)
    kq, vq = _np_kivi(np.asarray(k[0]), np.asarray(v[0]), 2, 8)
    qk, qv = 37 // 8 * 8, 37 - 8
    np.testing.assert_allclose(k_deq[0, :qk], kq[:qk], atol=1e-6)
    np.testing.assert_allclose(v_deq[0, :qv], vq[:qv], atol=1e-6)
    window = np.arange(qk, 37)
    np.testing.assert_array_equal(one.k.window_BRKH[0, window % 8], k[0, qk:])
    np.testing.assert_array_equal(one.v.window_BRKH[0, np.arange(qv, 37) % 8], v[0, qv:])


def test_latent_rows_quantize_per_channel_and_decode_as_the_reference():
    cfg = CacheConfig(**KIVI, bits=4)
    L, P = 12, 4
    cache = latent_cache(
        batch=B, capacity=40, kv_lora_rank=L, rope_dim=P, dtype=jnp.float32, config=cfg
    )
    assert isinstance(cache, QuantizedLatentCache)
    q = _normal((5, 0), (B, 30, N, L + P))
    row = _normal((5, 1), (B, 30, L + P))

    o, cache = _run(cache, q, row[..., :L], row[..., L:])
    assert cache.row.scale_BGKX.shape == (B, 40 // 4, 1, L + P)
    r = np.asarray(row, np.float32)[:, :, None, :]
    want = np.zeros(o.shape, np.float32)
    for b in range(B):
        kq, _ = _np_kivi(r[b], None, 4, 4)
        for lo, hi in [(0, 11)] + [(i, i + 1) for i in range(11, 30)]:
            qk = lo // 8 * 8
            kk = np.concatenate([kq[:qk], r[b, qk:hi]])
            pos = np.arange(hi)
            want[b, lo:hi] = _np_attend(np.asarray(q[b, lo:hi]), kk, kk, pos[lo:hi], pos)
    np.testing.assert_allclose(o, want, atol=2e-5)


def test_the_decode_loop_reads_blocks_and_never_builds_the_fp_cache():
    cfg = CacheConfig(**KIVI, bits=2)
    c = 256
    cache = QuantizedKVCache.create(
        batch=1, capacity=c, num_kv_heads=K, head_dim=H, dtype=jnp.float32, config=cfg
    ).with_lengths(200)
    q, k, v = (a[:1, :1] for a in _qkv(1))
    fn = lambda cache: cache.update_and_attend(
        q, k, v, mask=Causal(), block_sizes=DecodeBlockSizes(block_kv=32)
    )[0]  # fmt: skip
    shapes = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(o.aval.shape) for o in eqn.outvars if hasattr(o.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(cache).jaxpr)
    assert (1, 32, K, H) in shapes  # a dequantized block
    assert not any(len(s) == 4 and s[1] >= c and s[-1] == H for s in shapes)


def test_bytes_per_token_is_the_kivi_2bit_formula_and_the_buffers():
    cfg = CacheConfig(format="kivi", bits=2, group_size=32, residual=128)  # fp16 scales/zeros
    kh, h, ctx = 8, 128, 32768
    shape = dict(batch=1, capacity=ctx, num_kv_heads=kh, head_dim=h, dtype=jnp.bfloat16)
    cache = jax.eval_shape(lambda: dense_cache(config=cfg, **shape))
    # keys: 2-bit codes + fp16 scale and zero per channel per 32 tokens; values: per token,
    # one fp16 scale and zero per 32 channels
    per_token = kh * (h * 2 / 8 + 2 * 2 * h / 32) + kh * (h * 2 / 8 + 2 * 2 * (h / 32))
    window = 2 * 128 * kh * h * 2  # the bf16 windows of keys and values
    assert QuantizedKVCache.bytes_per_token(cache) == per_token
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) - 4  # minus lengths
    assert total == per_token * ctx + window
    assert QuantizedKVCache.bytes_per_token(cache, ctx) == (per_token * ctx + window) / ctx
    bf16 = jax.eval_shape(lambda: KVCache.create(**shape))
    ratio = QuantizedKVCache.bytes_per_token(cache, ctx) / KVCache.bytes_per_token(bf16)
    assert 0.18 < ratio < 0.20  # KIVI's "about 0.19 of bf16" at 32K


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"CacheConfig.bits=5 must be one of"):
        CacheConfig(format="kivi", bits=5)
    with pytest.raises(ValueError, match=r"group_size=48 must divide CacheConfig.residual=128"):
        CacheConfig(format="kivi", group_size=48)
    with pytest.raises(ValueError, match=r"group_size=32 must divide CacheConfig.sink=4"):
        CacheConfig(format="kivi", policy="sink_window", sink=4, window=64)
    with pytest.raises(ValueError, match=r"CacheConfig.bits=2 applies to the quantized formats"):
        CacheConfig(format="dense", bits=2)
    with pytest.raises(ValueError, match=r"scale_dtype='int8' must be a floating dtype"):
        CacheConfig(format="kivi", scale_dtype="int8")
    with pytest.raises(ValueError, match=r"group_size=16 must divide the value head dim 24"):
        dense_cache(batch=1, capacity=8, num_kv_heads=1, head_dim=32, v_head_dim=24,
                    config=CacheConfig(format="kivi", group_size=16))  # fmt: skip
    with pytest.raises(ValueError, match=r"cache.format='latent' cannot be stored in a dense"):
        dense_cache(batch=1, capacity=8, num_kv_heads=1, head_dim=8,
                    config=CacheConfig(format="latent"))  # fmt: skip
    cfg = CacheConfig(format="kivi")
    assert (cfg.bits, cfg.group_size, cfg.residual, cfg.scale_dtype) == (2, 32, 128, "float16")
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg


def _np_hadamard(n):
    """Sylvester's Hadamard matrix, normalised."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def test_hadamard_is_orthogonal_its_own_inverse_keeps_scores_and_spreads_outliers():
    x, y = np.asarray(_normal(0, (2, 5, 16)))
    outlier = x.copy()
    outlier[:, 3] *= 30.0

    @jax.jit  # one program (eager, every op of the transform compiles alone)
    def rotations(x, y, outlier):
        h = kv_quant.hadamard
        return h(jnp.eye(16)), h(h(x)), h(x) @ h(y).T, h(outlier)

    hm, back, scores, spread = (np.asarray(a) for a in rotations(x, y, outlier))
    np.testing.assert_allclose(hm, _np_hadamard(16), atol=1e-6)
    np.testing.assert_allclose(hm @ hm.T, np.eye(16), atol=1e-6)  # H Hᵀ = I
    np.testing.assert_allclose(back, x, atol=1e-5)
    # rotated queries and keys give the unrotated scores (RotateKV, before quantization)
    np.testing.assert_allclose(scores, x @ y.T, rtol=1e-5, atol=1e-5)
    assert np.abs(spread).max() < 0.5 * np.abs(outlier).max()
    with pytest.raises(ValueError, match="power-of-two last axis, got 12"):
        kv_quant.hadamard(jnp.ones((2, 12)))


def test_rotatekv_decodes_as_rotated_kivi_and_beats_kivi_on_an_outlier_value_channel():
    # one group per value row (G = H): FULL_2BIT's fields, so the kivi run reuses its program
    fields = dict(group_size=8, residual=8, bits=2)
    pos = np.arange(37)
    err = {"kivi": [], "rotatekv": []}
    for seed in range(4):  # compiled once per format; the error is pooled over 4 draws
        q, k, v = _qkv(37, seed=seed)
        v = v.at[..., 5].multiply(20.0)  # an outlier channel in the values
        exact = np.stack([_np_attend(*(np.asarray(a[b], np.float32) for a in (q, k, v)), pos,
                                     pos) for b in range(B)])  # fmt: skip
        for fmt in err:
            cfg = CacheConfig(format=fmt, **fields)
            cache = dense_cache(
                batch=B, capacity=40, num_kv_heads=K, head_dim=H, dtype=jnp.float32, config=cfg
            )
            assert cache.rotate == (fmt == "rotatekv")
            o = np.asarray(_run(cache, q, k, v)[0])
            err[fmt].append(np.abs(o - exact).mean())
            if fmt == "rotatekv" and seed == 0:
                hm = _np_hadamard(H).astype(np.float32)
                rot = lambda a: np.asarray(a, np.float32) @ hm
                want = _reference(rot(q), rot(k), rot(v), cfg) @ hm  # dequantize-then-attend
                np.testing.assert_allclose(o, want, atol=2e-4)
    err = {f: float(np.mean(e)) for f, e in err.items()}
    assert err["rotatekv"] < 0.9 * err["kivi"], err  # measured 0.369 vs 0.435
    with pytest.raises(ValueError, match="head_dim=24 must be a power of two"):
        dense_cache(batch=1, capacity=8, num_kv_heads=1, head_dim=24, config=cfg)
    with pytest.raises(ValueError, match="'rotatekv' cannot be stored in a latent cache"):
        latent_cache(batch=1, capacity=8, kv_lora_rank=8, rope_dim=8, config=cfg)
