"""MiKV's mixed precision per token (issue 19, PAPERS.md §5): every token stays, the heavy
hitters by H2O's accumulated attention and the recent window in full precision, the rest at
low bits; against a numpy simulation written from the paper's rules, the dense cache (every
token at high precision), the byte formula, and H2O eviction at an equal memory budget.

The numpy reference: before each step the tokens of the last R positions and of the table are
in full precision and the others dequantized from per-token KIVI codes (fp16 scale and zero
per group of channels); after the softmax every key's probability, summed over heads and
queries, is added to its score; the tokens that left the window compete with the table and
the S largest scores stay (H2O's greedy selection).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.cache import CacheConfig, KVCache, MixedPrecisionKVCache, dense_cache
from jaxattn.masks import Causal

F16 = np.float16
B, N, K, H, T, C, PREFILL = 2, 4, 2, 8, 37, 40, 11
MIKV = dict(format="mikv", bits=2, group_size=4, residual=8)


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def _qkv(seed=0):
    return (
        _normal((seed, 0), (B, T, N, H)),
        _normal((seed, 1), (B, T, K, H)),
        _normal((seed, 2), (B, T, K, H)),
    )


def _np_quant_tokens(x_TKH, bits, g):
    """KIVI's per-token quantization (z = min, s = (max - min) / (2^b - 1), fp16 z rounded
    down and s up) over groups of g channels: the dequantized rows."""
    t, kh, h = x_TKH.shape
    x = x_TKH.reshape(t, kh, h // g, g).astype(np.float32)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    z = lo.astype(F16)
    z = np.where(z.astype(np.float32) > lo, np.nextafter(z, F16(-np.inf)), z).astype(np.float32)
    s32 = (hi - z) / np.float32(2**bits - 1)
    s = s32.astype(F16)
    s = np.where(s.astype(np.float32) < s32, np.nextafter(s, F16(np.inf)), s).astype(np.float32)
    inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    codes = np.clip(np.round((x - z) * inv), 0, 2**bits - 1)
    return (codes * s + z).reshape(t, kh, h)


def _np_mikv(q, k, v, *, important, bits, group_size, residual, drop_low=False,
             normalized=False):  # fmt: skip
    """Outputs [B, T, N, H], final table positions (sets) and scores per sequence; with
    ``drop_low`` the tokens outside the table and the window are evicted (H2O alone); with
    ``normalized`` the ranking is ZipCache's: each score over the queries that attended it."""
    out = np.zeros(q.shape, np.float32)
    tables = []
    for b in range(B):
        kl, vl = (_np_quant_tokens(x[b], bits, group_size) for x in (k, v))
        score, count = np.zeros(T, np.float64), np.zeros(T, np.float64)
        table = []
        for lo, hi in [(0, PREFILL)] + [(i, i + 1) for i in range(PREFILL, T)]:
            q_old = max(lo - residual, 0)
            full = np.zeros(hi, bool)
            full[q_old:] = True
            full[table] = True
            kk = np.where(full[:, None, None], k[b, :hi], kl[:hi])
            vv = np.where(full[:, None, None], v[b, :hi], vl[:hi])
            s = np.einsum("tnh,snh->nts", q[b, lo:hi], np.repeat(kk, N // K, 1)) / np.sqrt(H)
            vis = np.arange(hi)[None, :] <= np.arange(lo, hi)[:, None]
            if drop_low:
                vis &= full[None, :]
            s = np.where(vis[None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, lo:hi] = np.einsum("nts,snv->tnv", p, np.repeat(vv, N // K, 1))
            score[:hi] += p.sum((0, 1))
            count[:hi] += vis.sum(0)
            leaving = list(range(q_old, max(hi - residual, 0)))
            pool = table + leaving  # the table first, then the older token, on ties
            rank = score / np.maximum(count, 1) if normalized else score
            table = sorted(pool, key=lambda i: -rank[i])[:important]
        tables.append((set(table), score, count) if normalized else (set(table), score))
    return out, tables


@jax.jit
def _run(cache, q, k, v):
    """Prefill PREFILL tokens, then one per step (a scan): outputs [B, T, N, V], the cache."""
    o0, cache = cache.update_and_attend(q[:, :PREFILL], k[:, :PREFILL], v[:, :PREFILL],
                                        mask=Causal())  # fmt: skip

    def step(cache, x):
        o, cache = cache.update_and_attend(*(a[:, None] for a in x), mask=Causal())
        return cache, o[:, 0]

    xs = tuple(jnp.swapaxes(a[:, PREFILL:], 0, 1) for a in (q, k, v))
    cache, rest = jax.lax.scan(step, cache, xs)
    return jnp.concatenate([o0, jnp.swapaxes(rest, 0, 1)], 1), cache, cache.k.dequant_slots(0, C)


def _mikv(important, dtype=jnp.float32, saliency=None):
    cfg = CacheConfig(**MIKV, important=important, saliency=saliency)
    return dense_cache(batch=B, capacity=C, num_kv_heads=K, head_dim=H, dtype=dtype, config=cfg)


@pytest.fixture(scope="module")
def s4_run():
    """The S = 4 cache on one draw: (q, k, v, outputs, cache, dequantized key slots)."""
    q, k, v = _qkv(0)
    cache = _mikv(4)
    assert isinstance(cache, MixedPrecisionKVCache) and cache.important == 4
    return (q, k, v, *_run(cache, q, k, v))


def test_every_token_at_high_precision_is_the_dense_cache():
    q, k, v = _qkv(1)
    o, cache, _ = _run(_mikv(C), q, k, v)
    dense = KVCache.create(batch=B, capacity=C, num_kv_heads=K, head_dim=H, dtype=jnp.float32)
    o_dense, _, _ = jax.jit(lambda c: (*c.update_and_attend(q, k, v, mask=Causal()), 0))(dense)
    # the same softmax split differently (blocks, table, window, new): rounding only
    np.testing.assert_allclose(o, o_dense, rtol=0, atol=1e-6)
    # every token that left the window is in the table, with its exact full-precision row
    left = T - MIKV["residual"]
    for b in range(B):
        pos = np.asarray(cache.hi_pos_BS[b])
        assert sorted(pos[pos >= 0]) == list(range(left))
        np.testing.assert_array_equal(cache.hi_k_BSKH[b][pos >= 0], k[b, pos[pos >= 0]])


def test_decode_and_the_table_follow_the_numpy_mikv_simulation(s4_run):
    q, k, v, o, cache, k_low = s4_run
    want, tables = _np_mikv(q, k, v, important=4, bits=2, group_size=4, residual=8)
    np.testing.assert_allclose(o, want, atol=2e-5)
    left = T - MIKV["residual"]
    for b, (table, score) in enumerate(tables):
        pos = np.asarray(cache.hi_pos_BS[b])
        assert set(pos.tolist()) == table and len(table) == 4  # the importance ranking
        np.testing.assert_allclose(cache.hi_score_BS[b], score[pos], rtol=1e-4)
        np.testing.assert_array_equal(cache.hi_v_BSKV[b], v[b, pos])
        # no token left behind: every token out of the window has its low-precision codes
        np.testing.assert_allclose(k_low[b, :left], _np_quant_tokens(k[b], 2, 4)[:left],
                                   atol=1e-6)  # fmt: skip
        # the window's scores: the tokens' accumulated attention
        wpos = np.arange(left, T)
        np.testing.assert_allclose(cache.win_score_BR[b, wpos % 8], score[wpos], rtol=1e-4)
    # each query's probabilities sum to one per head: the scores count every query and head
    total = sum(s.sum() for _, s in tables)
    assert np.isclose(total, B * T * N)


def test_low_precision_beats_eviction_at_an_equal_memory_budget(s4_run):
    q, k, v, o, cache, _ = s4_run
    exact, _ = _np_mikv(q, k, v, important=C, bits=2, group_size=4, residual=8)
    # H2O alone with the bytes MiKV spends on low-precision rows given to full-precision ones
    fp_row = 2 * K * H * 4  # a token's fp32 key and value
    left = T - MIKV["residual"]
    low_bytes = cache.bytes_per_token() * left
    s_evict = 4 + int(low_bytes // fp_row)
    evict, _ = _np_mikv(q, k, v, important=s_evict, bits=2, group_size=4, residual=8,
                        drop_low=True)  # fmt: skip
    late = slice(PREFILL + 8, T)  # once tokens have left the window
    err_mikv = np.abs(np.asarray(o) - exact)[:, late].mean()
    err_evict = np.abs(evict - exact)[:, late].mean()
    # measured 0.032 (S = 4 and 25 tokens at 2 bits) vs 0.091 (13 tokens, the others dropped)
    assert s_evict > 4 and err_mikv < err_evict, (s_evict, err_mikv, err_evict)


def test_zipcache_normalized_saliency_ranks_by_attention_over_the_queries_that_saw_it(s4_run):
    q, k, v, _, h2o, _ = s4_run
    cache = _mikv(4, saliency="normalized")
    assert cache.normalized and cache.hi_count_BS.shape == (B, 4)
    o, cache, _ = _run(cache, q, k, v)
    want, tables = _np_mikv(q, k, v, important=4, bits=2, group_size=4, residual=8,
                            normalized=True)  # fmt: skip
    np.testing.assert_allclose(o, want, atol=2e-5)
    for b, (table, score, count) in enumerate(tables):
        pos = np.asarray(cache.hi_pos_BS[b])
        assert set(pos.tolist()) == table
        # the number of queries that can attend token p (causal): the T - p from p on
        np.testing.assert_array_equal(cache.hi_count_BS[b], T - pos)
        np.testing.assert_array_equal(count, T - np.arange(T))
        normalized = cache.hi_score_BS[b] / cache.hi_count_BS[b]
        np.testing.assert_allclose(normalized, score[pos] / count[pos], rtol=1e-4)
    # the accumulated score favours early tokens (more queries saw them); the normalized one
    # does not, so it keeps later tokens on this draw
    mean_pos = lambda c: np.asarray(c.hi_pos_BS, np.float64).mean()
    assert mean_pos(cache) > mean_pos(h2o), (cache.hi_pos_BS, h2o.hi_pos_BS)


def test_bytes_per_token_is_the_formula_and_the_buffers():
    cfg = CacheConfig(format="mikv", bits=2, group_size=32, residual=128, important=256)
    kh, h, ctx = 8, 128, 32768
    cache = jax.eval_shape(
        lambda: dense_cache(
            batch=1, capacity=ctx, num_kv_heads=kh, head_dim=h, dtype=jnp.bfloat16, config=cfg
        )  # fmt: skip
    )
    # keys and values per token: 2-bit codes, one fp16 scale and zero per 32 channels
    low = 2 * kh * (h * 2 / 8 + 2 * 2 * h / 32)
    fp_row = 2 * kh * h * 2  # bf16 key + value
    fixed = 128 * fp_row + 128 * 4 + 256 * (fp_row + 4 + 4)  # window, its scores, the table
    assert cache.bytes_per_token() == low
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) - 4  # minus lengths
    assert total == low * ctx + fixed
    assert cache.bytes_per_token(ctx) == total / ctx
    assert cache.important == 256
    # "normalized" saliency: an fp32 count beside each score
    cfg = CacheConfig(format="mikv", important=256, saliency="normalized")
    norm = jax.eval_shape(
        lambda: dense_cache(
            batch=1, capacity=ctx, num_kv_heads=kh, head_dim=h, dtype=jnp.bfloat16, config=cfg
        )  # fmt: skip
    )
    assert norm.table_bytes() == cache.table_bytes() + 4 * (128 + 256)
    norm_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(norm)) - 4
    assert norm.bytes_per_token(ctx) == norm_total / ctx == (total + 4 * (128 + 256)) / ctx


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"CacheConfig.important=-1 must be >= 0"):
        CacheConfig(format="mikv", important=-1)
    with pytest.raises(ValueError, match=r"important=8 applies to format='mikv' only"):
        CacheConfig(format="kivi", important=8)
    with pytest.raises(ValueError, match=r"saliency='max' must be one of"):
        CacheConfig(format="mikv", saliency="max")
    with pytest.raises(ValueError, match=r"saliency='normalized' applies to format='mikv'"):
        CacheConfig(format="kivi", saliency="normalized")
    with pytest.raises(ValueError, match=r"keeps every token .*policy='sink_window' must be"):
        CacheConfig(format="mikv", policy="sink_window", sink=0, window=64)
    with pytest.raises(ValueError, match=r"group_size=16 must divide the key head dim 24"):
        dense_cache(batch=1, capacity=8, num_kv_heads=1, head_dim=24,
                    config=CacheConfig(format="mikv", group_size=16))  # fmt: skip
    cfg = CacheConfig(format="mikv")
    assert (cfg.bits, cfg.group_size, cfg.residual, cfg.important) == (2, 32, 128, 128)
    assert cfg.saliency == "accumulated"
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg
    # no group of tokens: a residual that is not a multiple of group_size is fine
    assert CacheConfig(format="mikv", group_size=32, residual=20).residual == 20
