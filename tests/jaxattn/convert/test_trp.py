"""TRP (PAPERS.md §9): the nuclear-norm sub-gradient, the energy rank rule and truncation, and
trained rank pruning on a toy regression.

Faithful tests: the sub-gradient is U Vᵀ and equals the numerical derivative of ‖W‖_* at a
full-rank matrix with distinct singular values; truncation is the rank-k SVD with k the least
rank reaching the energy ratio; training with the regulariser and periodic truncation on a noisy
low-rank target ends low-rank (plain training does not), and truncating it to the learned rank
changes the loss negligibly (but plain training's loss visibly).
"""

import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)


def _with_spectrum(sigma, shape):
    u, _ = np.linalg.qr(RNG.normal(size=(shape[0], len(sigma))))
    v, _ = np.linalg.qr(RNG.normal(size=(shape[1], len(sigma))))
    return (u * np.asarray(sigma, np.float64)) @ v.T


def _nuclear(w):
    return np.linalg.svd(w, compute_uv=False).sum()


def test_subgradient_is_uvt_and_the_derivative():
    w = _with_spectrum([5.0, 3.0, 2.0, 1.5, 1.0, 0.5], (9, 6))
    g = C.nuclear_subgradient(w)
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(g, u @ vt, atol=1e-12)
    h = 1e-6
    num = np.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            e = np.zeros_like(w)
            e[i, j] = h
            num[i, j] = (_nuclear(w + e) - _nuclear(w - e)) / (2 * h)
    np.testing.assert_allclose(g, num, atol=1e-7)
    # ⟨G, W⟩ = ‖W‖_* (a sub-gradient of a norm at W)
    np.testing.assert_allclose((g * w).sum(), _nuclear(w), rtol=1e-12)


def test_subgradient_rank_deficient_and_zero():
    w = _with_spectrum([4.0, 2.0, 0.0, 0.0], (7, 5))
    g = C.nuclear_subgradient(w)
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(g, u[:, :2] @ vt[:2], atol=1e-10)
    assert np.linalg.matrix_rank(g) == 2
    np.testing.assert_array_equal(C.nuclear_subgradient(np.zeros((3, 4))), 0.0)


def test_energy_rank_is_least_reaching():
    sigma = np.array([3.0, 2.0, 1.0, 1.0, 0.5])  # energies 9, 4, 1, 1, 0.25 of 15.25
    share = np.cumsum(sigma**2) / np.sum(sigma**2)
    for e in [0.1, 9 / 15.25, 0.6, 0.85, 14 / 15.25, 0.95, 0.99, 1.0]:
        k = C.energy_rank(sigma[::-1], e)  # order does not matter
        assert share[k - 1] >= e * (1 - 1e-12)
        assert k == 1 or share[k - 2] < e
    assert C.energy_rank(sigma, 9 / 15.25) == 1  # exactly reached at k = 1
    assert C.energy_rank(sigma, 1.0) == 5
    assert C.energy_rank([2.0, 1.0, 0.0], 1.0) == 2  # zero directions never kept


def test_truncate_is_rank_k_svd():
    sigma = [6.0, 4.0, 2.0, 1.0, 0.5]
    w = _with_spectrum(sigma, (10, 8))
    a, b, info = C.trp_truncate(w, energy=0.95)  # 36+16 = 52 of 57.25 < 0.95; +4 reaches
    assert info["rank"] == 3 and a.shape == (10, 3) and b.shape == (3, 8)
    np.testing.assert_allclose(info["energy"], 56 / 57.25)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(a @ b, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-12)
    np.testing.assert_allclose(info["error"], np.sqrt(1.25), atol=1e-12)
    a, b, info = C.trp_truncate(w, rank=5)
    np.testing.assert_allclose(a @ b, w, atol=1e-12)
    assert info["error"] < 1e-12 and info["energy"] == pytest.approx(1.0)


def _train(x, y, *, lam, energy, steps=810, lr=0.05, every=20):
    """Gradient descent on ½ mean ‖x W − y‖² (+ λ ‖W‖_* and TRP truncation every ``every``;
    the last steps after a truncation are training steps, so the result is not truncated)."""
    n = x.shape[0]
    w = np.zeros((x.shape[1], y.shape[1]))
    for t in range(1, steps + 1):
        grad = x.T @ (x @ w - y) / n
        if lam:
            grad = grad + lam * C.nuclear_subgradient(w, rtol=1e-8)
        w = w - lr * grad
        if energy is not None and t % every == 0:
            a, b, _ = C.trp_truncate(w, energy=energy)
            w = a @ b
    return w


def _loss(x, y, w):
    return 0.5 * np.mean(np.sum((x @ w - y) ** 2, axis=1))


def _rank(w, energy=0.999):
    return C.energy_rank(np.linalg.svd(w, compute_uv=False), energy)


def test_trained_rank_pruning_toy_regression():
    n, i, o, r = 400, 16, 12, 3
    x = RNG.normal(size=(n, i))
    w_true = _with_spectrum([3.0, 2.0, 1.5], (i, o))
    y = x @ w_true + 0.5 * RNG.normal(size=(n, o))  # noise fills every direction of the fit
    plain = _train(x, y, lam=0.0, energy=None)
    trp = _train(x, y, lam=0.1, energy=0.995)
    # the regularised, truncated weight is low-rank; the plain fit spreads over more ranks
    # (measured: rank 3 vs 7 at 99.9% energy)
    assert _rank(trp) == r < _rank(plain)
    assert _rank(plain) >= 6
    # truncating to the learned rank: a small change for TRP, 5x more for plain training
    # (measured: relative weight error 0.009 vs 0.071, loss +0.5% vs +2.6%)
    a, b, info_trp = C.trp_truncate(trp, rank=r)
    d_trp = _loss(x, y, a @ b) / _loss(x, y, trp) - 1
    a, b, info_plain = C.trp_truncate(plain, rank=r)
    d_plain = _loss(x, y, a @ b) / _loss(x, y, plain) - 1
    assert info_trp["relative_error"] < 0.02 < 0.05 < info_plain["relative_error"]
    assert 0 <= d_trp < 0.01 and d_plain > 5 * d_trp
    # and the TRP model stays close to the best (least-squares) fit's loss
    assert _loss(x, y, trp) < 1.05 * _loss(x, y, plain)


def test_bad_input():
    with pytest.raises(ValueError, match="w_IO"):
        C.nuclear_subgradient(np.ones(3))
    with pytest.raises(ValueError, match="rtol"):
        C.nuclear_subgradient(np.ones((2, 2)), rtol=-1.0)
    with pytest.raises(ValueError, match="energy"):
        C.energy_rank([1.0, 0.5], 0.0)
    with pytest.raises(ValueError, match="sigma"):
        C.energy_rank([0.0, 0.0], 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        C.trp_truncate(np.ones((3, 3)))
    with pytest.raises(ValueError, match="rank"):
        C.trp_truncate(np.ones((3, 4)), rank=4)
