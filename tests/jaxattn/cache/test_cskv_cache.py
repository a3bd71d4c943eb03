"""CSKV's bi-branch cache as a format (``CacheConfig(format="cskv")``, ``CSKVCache``).

Faithful tests: decoding through the cache (a prefill, then one token at a time) equals
``jaxattn.convert.cskv_attend`` on the same tokens at every step, unquantized and with 4-bit
features (``cskv_compress_features``); a window covering every token is exact attention; with
RoPE the old keys are reconstructed pre-RoPE and rotated at their positions, which equals
exact attention when the factors are exact (and the absorbed, rotation-free form does not);
``bytes_per_token`` is the buffers' byte count; bad input raises named errors. Ragged writes
(``num_new_B`` differing per row, a row adding none) equal ``cskv_attend`` on each row's own
stream and write no padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import convert as C
from jaxattn.cache import CacheConfig, CSKVCache
from jaxattn.layers import AttentionConfig
from jaxattn.ops.rope import RopeConfig, apply_rope

B, S, N, KV, H, RK, RV, W = 2, 9, 4, 2, 8, 6, 4, 4
RNG = np.random.default_rng(0)


def _data(rng=RNG):
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    ck, cv = f(B, S, RK), f(B, S, RV)
    up_k, up_v = f(RK, KV, H) / 2, f(RV, KV, H) / 2
    bias_k, bias_v = f(KV, H) / 4, f(KV, H) / 4
    return dict(q=f(B, S, N, H), k=f(B, S, KV, H), v=f(B, S, KV, H), ck=ck, cv=cv,
                up_k=up_k, up_v=up_v, bias_k=bias_k, bias_v=bias_v)  # fmt: skip


D = _data()


@jax.jit
def _step(cache, q, k, v, ck, cv, up_k, up_v, bias_k, bias_v):
    return cache.update_and_attend(q, k, v, ck_new_BTR=ck, cv_new_BTR=cv, up_k_RKH=up_k,
                                   up_v_RKV=up_v, bias_k_KH=bias_k, bias_v_KV=bias_v)  # fmt: skip


def _decode(cache, d, prefill=6):
    """Outputs [B, S, N, H]: a prefill of ``prefill`` tokens, then one token per step."""
    outs, t0 = [], 0
    consts = (d["up_k"], d["up_v"], d["bias_k"], d["bias_v"])
    for t1 in [prefill, *range(prefill + 1, S + 1)]:
        sl = slice(t0, t1)
        o, cache = _step(cache, d["q"][:, sl], d["k"][:, sl], d["v"][:, sl], d["ck"][:, sl],
                         d["cv"][:, sl], *consts)  # fmt: skip
        outs.append(np.asarray(o))
        t0 = t1
    return np.concatenate(outs, axis=1), cache


def _reference(d, window, ck, cv, prefill=6):
    """cskv_attend per sequence and step: the queries of each write over all tokens so far."""
    out = np.zeros((B, S, N, H), np.float32)
    t0 = 0
    for t1 in [prefill, *range(prefill + 1, S + 1)]:
        old = max(t1 - window, 0)
        for b in range(B):
            out[b, t0:t1] = C.cskv_attend(
                d["q"][b, t0:t1], d["k"][b, :t1], d["v"][b, :t1], ck[b, :old], cv[b, :old],
                d["up_k"], d["up_v"], window=window, bk_KH=d["bias_k"], bv_KH=d["bias_v"],
            )  # fmt: skip
        t0 = t1
    return out


def _cache(bits=None, residual=W, capacity=12):
    cfg = CacheConfig(format="cskv", residual=residual, bits=bits)
    return CSKVCache.create(batch=B, capacity=capacity, num_kv_heads=KV, head_dim=H, rank_k=RK,
                            rank_v=RV, dtype=jnp.float32, config=cfg)  # fmt: skip


def test_decode_equals_cskv_attend_at_every_step():
    got, cache = _decode(_cache(), D)
    np.testing.assert_allclose(got, _reference(D, W, D["ck"], D["cv"]), atol=2e-5)
    assert cache.lengths_B.tolist() == [S, S]
    # the cache keeps the features of every token and the exact rows of the last W only
    np.testing.assert_allclose(np.asarray(cache.features()[0])[:, :S], D["ck"], atol=0)
    assert cache.k_BWKH.shape[1] == W


def test_four_bit_features_equal_cskv_attend_on_compressed_features():
    got, cache = _decode(_cache(bits=4), D)
    ck = np.stack([C.cskv_compress_features(D["ck"][b], bits=4) for b in range(B)])
    cv = np.stack([C.cskv_compress_features(D["cv"][b], bits=4) for b in range(B)])
    ck, cv = ck.astype(np.float32), cv.astype(np.float32)
    np.testing.assert_allclose(np.asarray(cache.features()[0])[:, :S], ck, atol=1e-5)
    np.testing.assert_allclose(got, _reference(D, W, ck, cv), atol=1e-4)
    assert cache.ck_BCW.dtype == jnp.uint8 and cache.ck_BCW.shape[-1] == RK * 4 // 8


def _exact(q, k, v, causal_offset=0):
    """Causal softmax attention, fp64, q [B, T, N, H] at positions offset.. over k [B, S, K, H]."""
    g = N // KV
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    t, sk = q.shape[1], k.shape[1]
    s = np.where(np.arange(sk)[None, :] <= np.arange(t)[:, None] + causal_offset, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def test_window_covering_every_token_is_exact_attention():
    got, _ = _decode(_cache(residual=S), D)  # features never read: any values give the same
    np.testing.assert_allclose(got, _exact(D["q"], D["k"], D["v"]), atol=2e-5)


def test_rope_old_keys_are_rotated_after_reconstruction():
    rope = RopeConfig()
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    # exact factors: every key is c B_k + b_k before RoPE; the exact branch holds it rotated
    k_pre = np.einsum("bsr,rkh->bskh", D["ck"], D["up_k"]) + D["bias_k"]
    v = np.einsum("bsr,rkh->bskh", D["cv"], D["up_v"]) + D["bias_v"]
    k_rot = np.asarray(apply_rope(jnp.asarray(k_pre), pos, rope))
    q_rot = np.asarray(apply_rope(jnp.asarray(D["q"]), pos, rope))

    def run(rope_arg):
        cache = _cache()
        kw = dict(up_k_RKH=D["up_k"], up_v_RKV=D["up_v"], bias_k_KH=D["bias_k"],
                  bias_v_KV=D["bias_v"], rope=rope_arg)  # fmt: skip
        f = jax.jit(lambda c, *a: c.update_and_attend(*a[:3], ck_new_BTR=a[3], cv_new_BTR=a[4],
                                                      **kw))  # fmt: skip
        o1, cache = f(cache, q_rot[:, :6], k_rot[:, :6], v[:, :6], D["ck"][:, :6], D["cv"][:, :6])
        o2, _ = f(cache, q_rot[:, 6:], k_rot[:, 6:], v[:, 6:], D["ck"][:, 6:], D["cv"][:, 6:])
        return np.concatenate([np.asarray(o1), np.asarray(o2)], axis=1)

    ref = _exact(q_rot, k_rot, v)
    np.testing.assert_allclose(run(rope), ref, atol=2e-5)
    # absorbing B_k into the query ignores the old keys' rotation: wrong once tokens are old
    assert np.abs(run(None) - ref).max() > 1e-2


def test_bytes_per_token_is_the_buffers_bytes():
    for bits, dtype in ((None, jnp.bfloat16), (4, jnp.bfloat16), (2, jnp.float32)):
        cfg = CacheConfig(format="cskv", residual=W, bits=bits)
        cache = jax.eval_shape(lambda cfg=cfg, dtype=dtype: CSKVCache.create(
            batch=1, capacity=32, num_kv_heads=KV, head_dim=H, rank_k=8, rank_v=4,
            dtype=dtype, config=cfg))  # fmt: skip
        leaves = [cache.ck_BCW, cache.cv_BCW, cache.ck_scale_BC, cache.cv_scale_BC,
                  cache.k_BWKH, cache.v_BWKV]  # fmt: skip
        total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
        assert cache.bytes_per_token(32) * 32 == total
        per = 12 * 2 if bits is None else 12 * bits / 8 + 8  # codes + two fp32 scales
        assert cache.bytes_per_token() == per
    # CSKV's 80% figure: r_k + r_v = 0.2 of 2·N_kv·H channels at equal precision
    cfg = CacheConfig(format="cskv", residual=0)
    c = CSKVCache.create(batch=1, capacity=4, num_kv_heads=4, head_dim=16, rank_k=13,
                         rank_v=13, config=cfg)  # fmt: skip
    assert c.bytes_per_token() / (2 * 4 * 16 * 2) == pytest.approx(26 / 128)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="bits=3"):
        CacheConfig(format="cskv", bits=3)
    with pytest.raises(ValueError, match="policy='sink_window' must be 'full'"):
        CacheConfig(format="cskv", policy="sink_window", window=4)
    with pytest.raises(ValueError, match="group_size=8 does not apply to format='cskv'"):
        CacheConfig(format="cskv", group_size=8)
    with pytest.raises(ValueError, match="residual=-1"):
        CacheConfig(format="cskv", residual=-1)
    assert CacheConfig(format="cskv").residual == 128
    assert CacheConfig.from_dict(CacheConfig(format="cskv", bits=4).to_dict()).bits == 4
    with pytest.raises(ValueError, match="rank_k=5 times bits=4"):
        CSKVCache.create(batch=1, capacity=4, num_kv_heads=1, head_dim=4, rank_k=5, rank_v=4,
                         config=CacheConfig(format="cskv", bits=4))  # fmt: skip
    with pytest.raises(ValueError, match="format='cskv'"):
        CSKVCache.create(batch=1, capacity=4, num_kv_heads=1, head_dim=4, rank_k=4, rank_v=4,
                         config=CacheConfig(format="kivi"))  # fmt: skip
    cache = _cache()
    with pytest.raises(ValueError, match="ck_new_BTR"):
        cache.update_and_attend(D["q"][:, :1], D["k"][:, :1], D["v"][:, :1],
                                ck_new_BTR=D["ck"][:, :1, :2], cv_new_BTR=D["cv"][:, :1],
                                up_k_RKH=D["up_k"], up_v_RKV=D["up_v"])  # fmt: skip
    with pytest.raises(ValueError, match="capacity"):
        _decode(_cache(capacity=4), D)
    # no layer kind builds it from its own factors yet: a plain attention layer refuses it
    with pytest.raises(ValueError, match="cannot serve cache.format='cskv'"):
        AttentionConfig(d_model=16, num_heads=2, cache=CacheConfig(format="cskv"))


@jax.jit
def _ragged_step(cache, q, k, v, ck, cv, num_new_B):
    return cache.update_and_attend(q, k, v, ck_new_BTR=ck, cv_new_BTR=cv, up_k_RKH=D["up_k"],
                                   up_v_RKV=D["up_v"], bias_k_KH=D["bias_k"],
                                   bias_v_KV=D["bias_v"], num_new_B=num_new_B)  # fmt: skip


def test_ragged_writes_equal_cskv_attend_per_row():
    # three writes of T = 6, 3, 2 with different valid counts per row (row 1 adds none last);
    # row b's stream is its first tokens of D, the padded slots hold another row's tokens
    counts = [(6, 3), (1, 3), (2, 0)]
    cache, seen = _cache(), [0, 0]
    names = ("q", "k", "v", "ck", "cv")
    for step, num in enumerate(counts):
        t = (6, 3, 2)[step]
        rows = {x: np.zeros((B, t, *D[x].shape[2:]), np.float32) for x in names}
        for b in range(B):
            for x in names:  # valid tokens, then row 1 - b's tokens as padding
                src = np.concatenate([D[x][b, seen[b] :], D[x][1 - b]])[:t]
                rows[x][b] = src
        o, cache = _ragged_step(cache, *(rows[x] for x in names), jnp.asarray(num, jnp.int32))
        o = np.asarray(o)
        for b in range(B):
            t0, t1 = seen[b], seen[b] + num[b]
            if num[b]:
                old = max(t1 - W, 0)
                ref = C.cskv_attend(
                    D["q"][b, t0:t1], D["k"][b, :t1], D["v"][b, :t1], D["ck"][b, :old],
                    D["cv"][b, :old], D["up_k"], D["up_v"], window=W, bk_KH=D["bias_k"],
                    bv_KH=D["bias_v"],
                )  # fmt: skip
                np.testing.assert_allclose(o[b, : num[b]], ref, atol=2e-5)
            seen[b] = t1
    assert cache.lengths_B.tolist() == seen == [9, 6]
    # only the valid tokens were written: row 1's slots past its 6 tokens are still empty
    ck = np.asarray(cache.features()[0])
    np.testing.assert_allclose(ck[0, :9], D["ck"][0], atol=0)
    np.testing.assert_allclose(ck[1, :6], D["ck"][1, :6], atol=0)
    assert not ck[1, 6:].any()
