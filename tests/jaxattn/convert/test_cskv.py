"""CSKV (PAPERS.md §2): channel-shrunk K/V projections with a bi-branch cache.

Faithful tests: at full rank the factorised K/V projection equals the original; rank-r factors
are the Eckart–Young optimum of E‖x W − x A B‖² (error = the discarded singular values of X W);
tokens in the window are exact (window >= S gives exact attention whatever the features); the
compressed branch's feature dimension equals the rank; the absorbed decode (q B_kᵀ · cᵀ,
(p c_v) B_v) equals attention over reconstructed K and V; the layer-wise reconstruction loss
decreases during training; memory accounting gives the paper's 80% at r_k + r_v = 20% of the
2·N_kv·H channels (and 95% with 4-bit features).
"""

import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)
S, D, N, KV, H = 24, 16, 4, 2, 4  # N·H = 16, N_kv·H = 8
X = RNG.normal(size=(S, D)) * np.geomspace(2.0, 0.1, D)
WQ = RNG.normal(size=(D, N * H)) / np.sqrt(D)
WK = RNG.normal(size=(D, KV * H)) / np.sqrt(D)
WV = RNG.normal(size=(D, KV * H)) / np.sqrt(D)
WO = RNG.normal(size=(N * H, D)) / np.sqrt(N * H)
BK = RNG.normal(size=KV * H)


def _moments(x):
    return C.Moments(xx_DD=x.T @ x, x_D=x.sum(0), count=np.float64(len(x)))


def _attn(q, k, v):  # naive causal GQA reference, [S, N, H] / [S, KV, H]
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, 1), np.repeat(v, g, 1)
    s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((len(q), len(k)), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nts,snh->tnh", p, v)


def _qkv():
    return (X @ WQ).reshape(S, N, H), (X @ WK).reshape(S, KV, H), (X @ WV).reshape(S, KV, H)


@pytest.mark.parametrize("bias", [False, True])
def test_full_rank_projection_exact(bias):
    (ak, bk, ck), (av, bv, cv), info = C.cskv_init(
        WK, BK if bias else None, WV, None, _moments(X), rank_k=KV * H, rank_v=KV * H
    )
    np.testing.assert_allclose(X @ ak @ bk + ck, X @ WK + (BK if bias else 0), atol=1e-9)
    np.testing.assert_allclose(X @ av @ bv + cv, X @ WV, atol=1e-9)
    assert info["key"]["feature_error"] < 1e-6 and info["value"]["feature_error"] < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_rank_r_is_svd_optimum_and_feature_width(rank):
    (ak, bk, _), (av, bv, _), info = C.cskv_init(WK, None, WV, None, _moments(X),
                                                 rank_k=rank, rank_v=rank + 1)  # fmt: skip
    assert ak.shape == (D, rank) and bk.shape == (rank, KV * H) and av.shape == (D, rank + 1)
    for w, a, b, r, name in ((WK, ak, bk, rank, "key"), (WV, av, bv, rank + 1, "value")):
        y = X @ w
        _, s, vt = np.linalg.svd(y, full_matrices=False)
        np.testing.assert_allclose(a @ b, w @ vt[:r].T @ vt[:r], atol=1e-9)  # W V_r V_rᵀ
        err = np.sqrt(np.mean(np.sum((y - X @ a @ b) ** 2, 1)))
        np.testing.assert_allclose(err, np.sqrt((s[r:] ** 2).sum() / S), rtol=1e-8)
        np.testing.assert_allclose(info[name]["feature_error"], err, rtol=1e-8)


def test_bi_branch_attention():
    q, k, v = _qkv()
    ref = _attn(q, k, v)
    r = 3
    (ak, bk, _), (av, bv, _), _ = C.cskv_init(WK, None, WV, None, _moments(X), rank_k=r, rank_v=r)
    bk3, bv3 = bk.reshape(r, KV, H), bv.reshape(r, KV, H)
    # window >= S: every token exact, whatever the (empty) compressed branch
    o = C.cskv_attend(q, k, v, np.zeros((0, r)), np.zeros((0, r)), bk3, bv3, window=S)
    np.testing.assert_allclose(o, ref, atol=1e-5)
    # window w: the absorbed form equals attention over [reconstructed old K/V; exact window]
    w = 8
    ck, cv = X[: S - w] @ ak, X[: S - w] @ av
    assert ck.shape == (S - w, r)  # the compressed branch stores r features a token
    o = C.cskv_attend(q, k, v, ck, cv, bk3, bv3, window=w)
    k_mix = np.concatenate([(ck @ bk).reshape(-1, KV, H), k[S - w :]])
    v_mix = np.concatenate([(cv @ bv).reshape(-1, KV, H), v[S - w :]])
    np.testing.assert_allclose(o, _attn(q, k_mix, v_mix), atol=1e-5)
    # the old full-precision rows are never read: only the window's K/V and the features
    junk = RNG.normal(size=(S - w, KV, H)) * 1e3
    k_junk, v_junk = np.concatenate([junk, k[S - w :]]), np.concatenate([junk, v[S - w :]])
    o_junk = C.cskv_attend(q, k_junk, v_junk, ck, cv, bk3, bv3, window=w)
    np.testing.assert_allclose(o_junk, o, atol=1e-6)
    # window tokens are exact: with full-rank features the output is the original's
    (ak, bk, _), (av, bv, _), _ = C.cskv_init(WK, None, WV, None, _moments(X),
                                              rank_k=KV * H, rank_v=KV * H)  # fmt: skip
    o = C.cskv_attend(q, k, v, X[: S - w] @ ak, X[: S - w] @ av, bk.reshape(-1, KV, H),
                      bv.reshape(-1, KV, H), window=w)  # fmt: skip
    np.testing.assert_allclose(o, ref, atol=1e-5)
    # decode of the last token only (T = 1) is the last row; 4-bit features change it a little
    o1 = C.cskv_attend(q[-1:], k, v, ck, cv, bk3, bv3, window=w)
    np.testing.assert_allclose(o1[0], _attn(q, k_mix, v_mix)[-1], atol=1e-5)
    cq = C.cskv_compress_features(ck, bits=4)
    err = np.abs(cq - ck)
    assert err.max() > 0 and (err <= np.abs(ck).max(1, keepdims=True) / 14 + 1e-12).all()


def test_reconstruction_loss_decreases():
    x = RNG.normal(size=(2, S, D)) * np.geomspace(2.0, 0.1, D)
    (ak, bk, _), (av, bv, _), _ = C.cskv_init(WK, None, WV, None, _moments(x.reshape(-1, D)),
                                              rank_k=2, rank_v=2)  # fmt: skip
    weights = (WQ, WK, WV, WO)
    full = C.cskv_init(WK, None, WV, None, _moments(x.reshape(-1, D)), rank_k=8, rank_v=8)
    l_full = C.cskv_reconstruction_loss(((full[0][0], full[0][1]), (full[1][0], full[1][1])), x,
                                        weights, window=6, kv_heads=KV)  # fmt: skip
    assert float(l_full) < 1e-9  # full rank: nothing to reconstruct
    (fk, fv), hist = C.cskv_train(((ak, bk), (av, bv)), x, weights, window=6, kv_heads=KV,
                                  steps=60, lr=1e-2)  # fmt: skip
    loss = hist["loss"]
    assert loss[0] > 0 and loss[-1] < 0.8 * loss[0]
    assert fk[0].shape == (D, 2) and fv[1].shape == (2, KV * H)


def test_memory_accounting():
    # Llama-7B-like layer: N_kv·H = 4096 channels a token for K and for V
    m = C.cskv_bytes_per_token(kv_heads=32, head_dim=128, rank_k=819, rank_v=819)
    np.testing.assert_allclose(m["saving"], 1 - 1638 / 8192)
    assert abs(m["saving"] - 0.80) < 1e-3  # the paper's −80% KV memory
    assert m["full"] == 2 * 4096 * 2 and m["compressed"] == 1638 * 2
    m4 = C.cskv_bytes_per_token(kv_heads=32, head_dim=128, rank_k=819, rank_v=819, bits=4)
    assert abs(m4["saving"] - 0.95) < 1e-3  # the same ranks with 4-bit features: 95%
    assert m4["scale_bytes"] == 4 and m["scale_bytes"] == 0


def test_bad_input():
    m = _moments(X)
    with pytest.raises(ValueError, match="rank_k"):
        C.cskv_init(WK, None, WV, None, m, rank_k=9, rank_v=2)
    with pytest.raises(ValueError, match="rank_v"):
        C.cskv_init(WK, None, WV, None, m, rank_k=2, rank_v=0)
    with pytest.raises(ValueError, match="bits"):
        C.cskv_bytes_per_token(kv_heads=2, head_dim=4, rank_k=1, rank_v=1, bits=1)
    q, k, v = _qkv()
    z = np.zeros((1, KV, H))
    with pytest.raises(ValueError, match="S − window"):
        C.cskv_attend(q, k, v, np.zeros((3, 1)), np.zeros((3, 1)), z, z, window=4)
    with pytest.raises(ValueError, match="window"):
        C.cskv_attend(q, k, v, np.zeros((0, 1)), np.zeros((0, 1)), z, z, window=-1)
    with pytest.raises(ValueError, match="S > window"):
        C.cskv_train(((WK[:, :2], WK[:2]), (WV[:, :2], WV[:2])), X[None], (WQ, WK, WV, WO),
                     window=S, kv_heads=KV, steps=1, lr=1e-3)  # fmt: skip


def test_folded_biases_in_absorbed_form():
    """A projection with a bias (Qwen2's K/V): the old branch adds b' after B, k = c B + b'."""
    bv = RNG.normal(size=KV * H)
    (ak, bk, ck), (av, bvv, cv), _ = C.cskv_init(WK, BK, WV, bv, _moments(X), rank_k=3, rank_v=3)
    q = (X @ WQ).reshape(S, N, H)
    k, v = (X @ WK + BK).reshape(S, KV, H), (X @ WV + bv).reshape(S, KV, H)
    w = 5
    fk, fv = X[: S - w] @ ak, X[: S - w] @ av
    o = C.cskv_attend(q, k, v, fk, fv, bk.reshape(3, KV, H), bvv.reshape(3, KV, H), window=w,
                      bk_KH=ck.reshape(KV, H), bv_KH=cv.reshape(KV, H))  # fmt: skip
    k_mix = np.concatenate([(fk @ bk + ck).reshape(-1, KV, H), k[S - w :]])
    v_mix = np.concatenate([(fv @ bvv + cv).reshape(-1, KV, H), v[S - w :]])
    np.testing.assert_allclose(o, _attn(q, k_mix, v_mix), atol=1e-5)
