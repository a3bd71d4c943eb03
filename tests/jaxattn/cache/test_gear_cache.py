"""GEAR as a cache format (issue 19, PAPERS.md §5): each compressed block of n_b tokens and head
reads back as ``jaxattn.ops.gear``'s D̂ + L + S of the same tokens, full rank without outliers
is exact, rank 0 without outliers is plain per-channel quantization, L + S lowers the error of
quantization alone, decoding is attention over what the cache reads back, the byte formula,
and bad fields named."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.cache import CacheConfig, GearCache, dense_cache
from jaxattn.masks import Causal
from jaxattn.ops.gear import gear_approximation
from jaxattn.ops.kv_quant import dequantize, quantize

B, N, K, H, T, C = 2, 4, 2, 8, 27, 32
NB, G = 8, 4  # n_b (the fp buffer, compressed n_b tokens at a time) and the group size
GEAR = dict(format="gear", bits=2, group_size=G, residual=NB, scale_dtype="float32")


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T + 1, n, H), np.float32) for n in (N, K, K))
    k[..., 2] += 3.0  # an outlier channel
    v[:, ::5, :, 5] = 9.0  # outlier entries
    return q, k, v


def _gear(**fields):
    cfg = CacheConfig(**{**GEAR, **fields})
    return dense_cache(batch=B, capacity=C, num_kv_heads=K, head_dim=H, dtype=jnp.float32,
                       config=cfg)  # fmt: skip


@jax.jit
def _run(cache, q, k, v):
    """T + 1 tokens one per step: (outputs [B, T + 1, N, H], the cache, what it reads back).
    Token T is stored in the buffer, so the read-back cache is what its query attended."""

    def step(cache, x):
        o, cache = cache.update_and_attend(*(a[:, None] for a in x), mask=Causal())
        return cache, o[:, 0]

    cache, o = jax.lax.scan(step, cache, tuple(jnp.swapaxes(a, 0, 1) for a in (q, k, v)))
    return jnp.swapaxes(o, 0, 1), cache, cache.reconstruct()


@functools.cache
def _results(rank, outliers):
    q, k, v = _qkv()
    o, cache, (rk, rv) = _run(_gear(rank=rank, outliers=outliers), q, k, v)
    return (q, k, v), o, cache, np.asarray(rk), np.asarray(rv)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _reference(x_MTH, rank, count):
    """ops.gear's D̂ + L + S of each [n_b, H] block, as the cache stores them."""
    ref = functools.partial(gear_approximation, bits=2, rank=rank, outliers=count, group_size=G,
                            axis="channel", outliers_per="vector", fill="zero")  # fmt: skip
    return jax.vmap(lambda x: ref(x)["approx"])(x_MTH)


def _blocks(x_BTKH, m):
    """The first m·n_b tokens as blocks [B · m · K, n_b, H]."""
    x = np.asarray(x_BTKH)[:, : m * NB].reshape(B, m, NB, K, H)
    return x.transpose(0, 1, 3, 2, 4).reshape(-1, NB, H)


def test_compressed_blocks_are_the_gear_reference_and_the_buffer_is_exact():
    (_, k, v), _, cache, rk, rv = _results(2, 0.25)
    m = T // NB  # compressed blocks; the last T - m·n_b tokens are in the fp buffer
    count = math.ceil(0.25 * H)
    assert cache.k.val_BCKO.shape[-1] == count and cache.k.a_BCKr.shape[-1] == 2
    for x, got in ((k, rk), (v, rv)):
        want = _reference(jnp.asarray(_blocks(x, m)), 2, count)
        np.testing.assert_allclose(_blocks(got, m), want, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(got[:, m * NB : T + 1], x[:, m * NB :])
        assert not got[:, T + 1 :].any()  # nothing past the length


@jax.jit
def _prefill(cache, k, v):
    """What a cache reads back after one write of the first T tokens (a prefill)."""
    return cache.write(k[:, :T], v[:, :T]).advance(T).reconstruct()


def test_full_rank_is_exact_rank_0_is_plain_quantization_and_l_plus_s_lower_the_error():
    _, k, v = _qkv()
    m = T // NB
    for x, got in zip((k, v), _prefill(_gear(rank=NB, outliers=0.25), k, v)):
        # rank min(n_b, H), outliers kept: exact
        np.testing.assert_allclose(got[:, :T], x[:, :T], rtol=0, atol=1e-5)
    rk0, rv0 = (np.asarray(a) for a in _prefill(_gear(rank=0, outliers=0.0), k, v))
    _, _, _, rk, rv = _results(2, 0.25)
    for x, plain, gear in ((k, rk0, rk), (v, rv0, rv)):
        xs = x[:, : m * NB].reshape(B, m * NB // G, G, K, H)  # channels over groups of G tokens
        codes, scale, zero = quantize(xs, 2, 2, scale_dtype=jnp.float32)
        quant = np.asarray(dequantize(codes, scale, zero)).reshape(B, m * NB, K, H)
        np.testing.assert_allclose(plain[:, : m * NB], quant, rtol=0, atol=1e-5)
        err = lambda y: float(np.linalg.norm(y[:, : m * NB] - x[:, : m * NB]))  # noqa: E731
        assert err(gear) < 0.7 * err(plain)  # GEAR's claim: below quantization alone


def _attend(q_BTNH, k_BSKH, v_BSKH):
    rep = N // K
    k, v = (np.repeat(a, rep, axis=2) for a in (k_BSKH, v_BSKH))
    s = np.einsum("btnh,bsnh->bnts", q_BTNH, k) / math.sqrt(H)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def test_decoding_is_attention_over_what_the_cache_reads_back():
    (q, k, v), o, _, rk, rv = _results(2, 0.25)
    # the query at position T: the T stored tokens as the cache reads them, and itself in fp
    want = _attend(q[:, T:], rk[:, : T + 1], rv[:, : T + 1])
    np.testing.assert_allclose(o[:, T:], want, rtol=0, atol=2e-5)
    err = float(np.abs(o[:, T:] - _attend(q[:, T:], k, v)).max())
    assert 0 < err < 0.5  # close to fp attention, not equal (2-bit codes)


def test_bytes_per_token_is_the_formula():
    cache = _gear(rank=2, outliers=0.25, scale_dtype="float16")
    o = math.ceil(0.25 * H)
    # per token and tensor: 2-bit codes, fp16 scale + zero per channel per G tokens, O fp32
    # values + uint8 indices, a fp32 row of A and 1/n_b of the block's fp32 B [r, H]
    per = K * (H * 2 / 8 + 2 * 2 * H / G + o * (4 + 1) + 2 * 4 + 2 * H * 4 / NB)
    assert cache.bytes_per_token() == 2 * per
    # a cache for 20 tokens: 20 slots, the fp buffers [n_b, K, H], 3 blocks' B, over 20
    slots, blocks = 20, math.ceil(20 / NB)
    total = 2 * (
        slots * K * (H * 2 / 8 + o * 5 + 2 * 4) + slots // G * K * H * 2 * 2
        + blocks * K * 2 * H * 4 + NB * K * H * 4
    )  # fmt: skip
    assert cache.bytes_per_token(20) == pytest.approx(total / 20, rel=1e-12)


def test_bad_fields_and_inputs_name_the_argument():
    cases = (
        (dict(rank=-1), r"rank=-1 must be >= 0"),
        (dict(outliers=0.7), r"outliers=0.7 must be a fraction"),
        (dict(group_size=3), r"group_size=3 must divide CacheConfig.residual=8"),
        (dict(policy="sink_window", sink=4, window=8), r"policy='sink_window' must be 'full'"),
    )
    for fields, match in cases:
        with pytest.raises(ValueError, match=match):
            CacheConfig(**{**GEAR, **fields})
    with pytest.raises(ValueError, match=r"rank=4 applies to format='gear' only, not format=.kivi"):
        CacheConfig(format="kivi", rank=4)
    with pytest.raises(ValueError, match=r"CacheConfig.rank=9 must be <= min\(residual=8"):
        _gear(rank=9)
    with pytest.raises(ValueError, match=r"head_dim=0 must be positive"):
        GearCache.create(batch=1, capacity=8, num_kv_heads=1, head_dim=0,
                         config=CacheConfig(**GEAR))  # fmt: skip
    cache = _gear()
    with pytest.raises(ValueError, match=r"new k .* do not match the cache's \[K, H\]=\[2, 8\]"):
        cache.update_and_attend(jnp.ones((B, 1, N, H)), jnp.ones((B, 1, K, 4)),
                                jnp.ones((B, 1, K, H)))  # fmt: skip
