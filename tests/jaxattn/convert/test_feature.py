"""Feature-based (AFM) low-rank compression of the CTR framework (PAPERS.md §9).

Faithful tests: the projection fitted on calibration output features reconstructs them exactly
at full rank; at a fixed rank its output error is <= weight SVD's. Beyond that: uncentred and
without a bias it is the Eckart–Young optimum of X W (W V_r V_rᵀ, error = the discarded singular
values), centred it is PCA of the outputs with the mean folded into the bias, and every
reported error matches a direct computation on the calibration matrix.
"""

import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)
N, I, O = 500, 12, 10
# anisotropic, off-centre inputs: feature fitting and weight SVD disagree
X = RNG.normal(size=(N, I)) * np.geomspace(3.0, 0.05, I) + RNG.normal(size=I)
W = RNG.normal(size=(I, O))
B = RNG.normal(size=O)


def _moments(x):
    return C.Moments(xx_DD=x.T @ x, x_D=x.sum(0), count=np.float64(len(x)))


def _err(y, y_hat):
    return np.sqrt(np.mean(np.sum((y - y_hat) ** 2, axis=1)))


@pytest.mark.parametrize("rank", [1, 3, 6, 9])
def test_uncentred_is_eckart_young_on_xw(rank):
    a, b, bias, info = C.feature_lowrank(W, None, _moments(X), rank=rank, center=False)
    assert a.shape == (I, rank) and b.shape == (rank, O)
    np.testing.assert_array_equal(bias, 0.0)
    y = X @ W
    _, s, vt = np.linalg.svd(y, full_matrices=False)
    v_r = vt[:rank].T
    np.testing.assert_allclose(a @ b, W @ v_r @ v_r.T, atol=1e-9)  # W V_r V_rᵀ
    err = _err(y, X @ a @ b)
    np.testing.assert_allclose(err, np.sqrt((s[rank:] ** 2).sum() / N), rtol=1e-9)
    np.testing.assert_allclose(info["feature_error"], err, rtol=1e-9)
    np.testing.assert_allclose(info["discarded"], err, rtol=1e-6)
    # weight SVD at the same rank: never better on the features, here clearly worse
    u, sw, wvt = np.linalg.svd(W, full_matrices=False)
    err_svd = _err(y, X @ ((u[:, :rank] * sw[:rank]) @ wvt[:rank]))
    np.testing.assert_allclose(info["feature_error_svd"], err_svd, rtol=1e-9)
    assert err <= err_svd + 1e-12
    assert err < 0.9 * err_svd  # measured: 0.81 (r = 1) and below


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_centred_is_output_pca_with_bias(rank):
    a, b, bias, info = C.feature_lowrank(W, B, _moments(X), rank=rank)
    y = X @ W + B
    mean = y.mean(0)
    _, s, vt = np.linalg.svd(y - mean, full_matrices=False)
    u_r = vt[:rank].T
    y_pca = (y - mean) @ u_r @ u_r.T + mean  # AFM: ŷ = U Uᵀ (y − ȳ) + ȳ
    np.testing.assert_allclose(X @ a @ b + bias, y_pca, atol=1e-8)
    err = _err(y, y_pca)
    np.testing.assert_allclose(err, np.sqrt((s[rank:] ** 2).sum() / N), rtol=1e-9)
    np.testing.assert_allclose(info["feature_error"], err, rtol=1e-9)
    np.testing.assert_allclose(info["relative_feature_error"], err / _err(y, 0 * y), rtol=1e-9)
    u, sw, wvt = np.linalg.svd(W, full_matrices=False)
    err_svd = _err(y, X @ ((u[:, :rank] * sw[:rank]) @ wvt[:rank]) + B)
    np.testing.assert_allclose(info["feature_error_svd"], err_svd, rtol=1e-9)
    assert err <= err_svd + 1e-12
    # centring helps when the outputs are off-centre (the uncentred fit of the same layer)
    unc = C.feature_lowrank(W, None, _moments(X), rank=rank, center=False)[3]
    cen = C.feature_lowrank(W, None, _moments(X), rank=rank)[3]
    assert cen["feature_error"] <= unc["feature_error"] + 1e-12


@pytest.mark.parametrize("center", [True, False])
def test_full_rank_exact(center):
    bias_in = B if center else None
    a, b, bias, info = C.feature_lowrank(W, bias_in, _moments(X), rank=O, center=center)
    y = X @ W + (B if center else 0.0)
    np.testing.assert_allclose(X @ a @ b + bias, y, atol=1e-8)
    assert info["feature_error"] < 1e-6
    # a wide layer (I < O): rank I already reproduces the features
    w_wide = RNG.normal(size=(4, 9))
    x = RNG.normal(size=(50, 4)) + 1.0
    a, b, bias, _ = C.feature_lowrank(w_wide, bias_in[:9] if center else None, _moments(x),
                                      rank=4, center=center)  # fmt: skip
    np.testing.assert_allclose(x @ a @ b + bias, x @ w_wide + (B[:9] if center else 0.0),
                               atol=1e-9)  # fmt: skip


def test_bad_input():
    m = _moments(X)
    with pytest.raises(ValueError, match="rank"):
        C.feature_lowrank(W, B, m, rank=O + 1)
    with pytest.raises(ValueError, match="b_O"):
        C.feature_lowrank(W, B[:3], m, rank=2)
    with pytest.raises(ValueError, match="center=False"):
        C.feature_lowrank(W, B, m, rank=2, center=False)
    with pytest.raises(ValueError, match="moments"):
        C.feature_lowrank(W, B, _moments(X[:, :5]), rank=2)
    with pytest.raises(ValueError, match="w_IO"):
        C.feature_lowrank(W[0], None, m, rank=1)
