"""MoDeGPT's three module decompositions (PAPERS.md §9; the paper's §3.2, Algorithms 1-3).

Faithful tests, per module type as the paper assigns them: MLP by Nyström (Algorithm 1),
key-query by CR decomposition (Algorithm 2), value-output by SVD (Algorithm 3). With no
reduction each module's outputs on the calibration data are reconstructed exactly; at a fixed
rank the module-output error on anisotropic calibration data is <= that of naive per-weight SVD
at the same parameter count. Every reported error matches a direct computation on the data.
"""

import math

import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)
N, D, H = 300, 12, 24  # tokens, model dim, MLP width
HQ, HKV, DH = 4, 2, 6  # query heads, kv heads, head dim
X = RNG.normal(size=(N, D)) * np.geomspace(3.0, 0.05, D)  # anisotropic inputs
W_U, W_G, W_D = (RNG.normal(size=s) / 3 for s in [(D, H), (D, H), (H, D)])
W_Q, W_K = RNG.normal(size=(D, HQ * DH)), RNG.normal(size=(D, HKV * DH))
W_V, W_O = RNG.normal(size=(D, HKV * DH)), RNG.normal(size=(HQ * DH, D))


def _moments(x):
    return C.Moments(xx_DD=x.T @ x, x_D=x.sum(0), count=np.float64(len(x)))


def _silu(z):
    return z / (1 + np.exp(-z))


def _mlp(x, up, gate, down):
    return (_silu(x @ gate) * (x @ up)) @ down


def _svd(w, r):
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _rms(e):  # sqrt of the mean over rows of the squared norm
    return np.sqrt(np.mean(np.sum(e.reshape(e.shape[0], -1) ** 2, axis=1)))


def _heads(w, h):  # [D, h·dh] -> [h, D, dh]
    return w.reshape(w.shape[0], h, -1).transpose(1, 0, 2)


def _scores(x, wq, wk, dh):  # per query head x W_q,h W_k,hᵀ xᵀ, [N, Hq, N]
    q, k = _heads(wq, HQ), _heads(wk, HKV)
    k = np.repeat(k, HQ // HKV, axis=0)
    return np.einsum("hne,hme->nhm", np.einsum("nd,hde->hne", x, q), np.einsum("md,hde->hme", x, k))


def _vo(x, wv, wo):  # per query head x W_v,h W_o,h, [N, Hq, D]
    v = np.repeat(_heads(wv, HKV), HQ // HKV, axis=0)
    o = wo.reshape(HQ, -1, D)
    return np.einsum("nd,hde,hef->nhf", x, v, o)


@pytest.mark.parametrize("gated", [True, False])
def test_mlp_nystrom_exact_at_full_width(gated):
    if gated:
        h = _silu(X @ W_G) * (X @ W_U)
        up, gate, down, info = C.modegpt_mlp(W_U, W_D, _moments(h), rank=H, w_gate_DH=W_G)
        np.testing.assert_allclose(_mlp(X, up, gate, down), _mlp(X, W_U, W_G, W_D), atol=1e-9)
    else:
        h = _silu(X @ W_U)
        up, gate, down, info = C.modegpt_mlp(W_U, W_D, _moments(h), rank=H)
        assert gate is None
        np.testing.assert_allclose(_silu(X @ up) @ down, h @ W_D, atol=1e-9)
    np.testing.assert_array_equal(info["kept"], np.arange(H))
    assert info["error"] < 1e-6


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_mlp_nystrom_beats_per_weight_svd(rank):
    h = _silu(X @ W_G) * (X @ W_U)
    up, gate, down, info = C.modegpt_mlp(W_U, W_D, _moments(h), rank=rank, w_gate_DH=W_G)
    assert up.shape == gate.shape == (D, rank) and down.shape == (rank, D)
    y = _mlp(X, W_U, W_G, W_D)
    err = _rms(y - _mlp(X, up, gate, down))
    np.testing.assert_allclose(info["error"], err, rtol=1e-8)
    # the compensated W_D' is the least-squares optimum for the kept dims
    h_s = h[:, info["kept"]]
    lsq = np.linalg.lstsq(h_s, h @ W_D, rcond=None)[0]
    np.testing.assert_allclose(err, _rms(y - h_s @ lsq), rtol=1e-8)
    # naive SVD of each weight, parameters >= Nyström's (k·D per matrix)
    r = math.ceil(rank * D / (D + H))
    err_svd = _rms(y - _mlp(X, _svd(W_U, r), _svd(W_G, r), _svd(W_D, r)))
    assert err <= err_svd
    assert err < 0.75 * err_svd  # measured: 0.61 (k = 4), 0.38, 0.21 (k = 16)
    # the ridge leverage scores are diag(C (C + λI)⁻¹), λ = tr(C)/H
    c = h.T @ h / N
    lev = np.diag(c @ np.linalg.inv(c + np.trace(c) / H * np.eye(H)))
    np.testing.assert_allclose(info["leverage"], lev, rtol=1e-8)
    assert set(info["kept"]) == set(np.argsort(-lev)[:rank])


def test_qk_cr_exact_at_full_head_dim():
    q, k, info = C.modegpt_qk(W_Q, W_K, _moments(X), num_heads=HQ, num_kv_heads=HKV, rank=DH)
    np.testing.assert_allclose(_scores(X, q, k, DH), _scores(X, W_Q, W_K, DH), atol=1e-9)
    assert info["error"] < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_qk_cr_beats_per_weight_svd(rank):
    q, k, info = C.modegpt_qk(W_Q, W_K, _moments(X), num_heads=HQ, num_kv_heads=HKV, rank=rank)
    assert q.shape == (D, HQ * rank) and k.shape == (D, HKV * rank)
    s = _scores(X, W_Q, W_K, DH)
    err = _rms(s - _scores(X, q, k, rank)) / np.sqrt(N)  # mean over token pairs
    np.testing.assert_allclose(info["error"], err, rtol=1e-8)
    np.testing.assert_allclose(info["relative_error"], err / (_rms(s) / np.sqrt(N)), rtol=1e-8)
    r = math.ceil(rank * D / (D + DH))
    qs = np.concatenate([_svd(w, r) for w in _heads(W_Q, HQ)], axis=1)
    ks = np.concatenate([_svd(w, r) for w in _heads(W_K, HKV)], axis=1)
    err_svd = _rms(s - _scores(X, qs, ks, DH)) / np.sqrt(N)
    np.testing.assert_allclose(info["error_svd"], err_svd, rtol=1e-8)
    assert err <= err_svd
    assert err < 0.9 * err_svd  # measured: 0.87 (k = 1), 0.60, 0.51 (k = 5)
    # CR scores: the kept dims of kv head j maximise sqrt(C_k,ii Σ_g C_q_g,ii)
    c = X.T @ X / N
    for j in range(HKV):
        kq = sum(np.diag(w.T @ c @ w) for w in _heads(W_Q, HQ)[2 * j : 2 * j + 2])
        kk = np.diag(_heads(W_K, HKV)[j].T @ c @ _heads(W_K, HKV)[j])
        assert set(info["kept"][j]) == set(np.argsort(-np.sqrt(kq * kk))[:rank])


def test_vo_svd_exact_at_full_head_dim():
    v, o, info = C.modegpt_vo(W_V, W_O, _moments(X), num_heads=HQ, num_kv_heads=HKV, rank=DH)
    np.testing.assert_allclose(_vo(X, v, o), _vo(X, W_V, W_O), atol=1e-9)
    assert info["error"] < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_vo_svd_is_eckart_young_and_beats_per_weight_svd(rank):
    v, o, info = C.modegpt_vo(W_V, W_O, _moments(X), num_heads=HQ, num_kv_heads=HKV, rank=rank)
    assert v.shape == (D, HKV * rank) and o.shape == (HQ * rank, D)
    y = _vo(X, W_V, W_O)
    err = _rms(y - _vo(X, v, o))
    np.testing.assert_allclose(info["error"], err, rtol=1e-8)
    # Eckart–Young on the calibration outputs of each kv head's module x W_v [W_o,1 | W_o,2]
    best = 0.0
    for j in range(HKV):
        yj = y[:, 2 * j : 2 * j + 2].reshape(N, -1)
        best += (np.linalg.svd(yj, compute_uv=False)[rank:] ** 2).sum() / N
    np.testing.assert_allclose(err, np.sqrt(best), rtol=1e-8)
    r = math.ceil(rank * D / (D + DH))
    vs = np.concatenate([_svd(w, r) for w in _heads(W_V, HKV)], axis=1)
    os_ = np.concatenate([_svd(w, r) for w in W_O.reshape(HQ, DH, D)], axis=0)
    err_svd = _rms(y - _vo(X, vs, os_))
    np.testing.assert_allclose(info["error_svd"], err_svd, rtol=1e-8)
    assert err <= err_svd and err <= info["error_product_svd"] + 1e-12
    assert err < 0.8 * info["error_product_svd"]  # measured: 0.77 (k = 1), 0.52, 0.32 (k = 5)


def test_mlp_dead_units():
    # ReLU units that never fire: C_σ singular, still exact at full width; all dead -> zeros
    h = np.maximum(X @ W_U, 0.0)
    h[:, :5] = 0.0
    up, _, down, info = C.modegpt_mlp(W_U, W_D, _moments(h), rank=H)
    np.testing.assert_allclose(h[:, info["kept"]] @ down, h @ W_D, atol=1e-9)
    _, _, down, info = C.modegpt_mlp(W_U, W_D, _moments(h), rank=H - 5)
    assert not set(info["kept"]) & set(range(5)) and info["error"] < 1e-6
    _, _, down, info = C.modegpt_mlp(W_U, W_D, _moments(np.zeros((N, H))), rank=3)
    assert np.isfinite(down).all() and info["error"] == 0.0 and info["relative_error"] == 0.0


def test_bad_input():
    m = _moments(X)
    with pytest.raises(ValueError, match="rank"):
        C.modegpt_qk(W_Q, W_K, m, num_heads=HQ, num_kv_heads=HKV, rank=DH + 1)
    with pytest.raises(ValueError, match="num_heads"):
        C.modegpt_vo(W_V, W_O, m, num_heads=3, num_kv_heads=HKV, rank=2)
    with pytest.raises(ValueError, match="moments_h"):
        C.modegpt_mlp(W_U, W_D, m, rank=2)
    with pytest.raises(ValueError, match="w_down_HD"):
        C.modegpt_mlp(W_U, W_D.T, m, rank=2)
    with pytest.raises(ValueError, match="ridge"):
        C.modegpt_mlp(W_U, W_D, _moments(X @ W_U), rank=2, ridge=-1.0)
