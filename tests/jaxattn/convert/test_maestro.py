"""Maestro (PAPERS.md §9): the ordered-dropout decomposed layer, its objective, training and
hierarchical truncation.

Faithful tests: a forward at keep-rank b uses only the first b components (nested); the
objective's no-key form is the mean of the sampled losses over b = 1..K; a linear autoencoder
trained with ordered dropout has, at every prefix b, its decoder span equal to the top-b PCA
subspace (small principal angles) and the PCA prefix loss Σ_{i>b} λ_i, while the same training
without ordered dropout gets the full-rank subspace but not its prefixes; linear regression on
uniform inputs recovers the truncated SVD of the map at every prefix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)


def _angle_deg(a, b):
    """The largest principal angle between span(a) and span(b), degrees."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    s = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(s.min(), -1.0, 1.0))))


def test_forward_uses_only_the_prefix():
    x = RNG.normal(size=(5, 6))
    u, v = RNG.normal(size=(6, 4)), RNG.normal(size=(4, 7))
    for b in range(0, 5):
        y = np.asarray(C.ordered_dropout_forward(x, u, v, b))
        np.testing.assert_allclose(y, x @ u[:, :b] @ v[:b], rtol=1e-5, atol=1e-5)
        u2, v2 = u.copy(), v.copy()
        u2[:, b:] = 99.0
        v2[b:] = -99.0
        np.testing.assert_allclose(np.asarray(C.ordered_dropout_forward(x, u2, v2, b)), y)
    # a traced keep-rank under jit
    f = jax.jit(lambda k: C.ordered_dropout_forward(x, u, v, k))
    np.testing.assert_allclose(np.asarray(f(jnp.int32(2))), x @ u[:, :2] @ v[:2], rtol=1e-5)
    with pytest.raises(ValueError, match="v_KO"):
        C.ordered_dropout_forward(x, u, v[:3], 2)


def test_objective_expectation_is_mean_over_sampled_ranks():
    x, y = RNG.normal(size=(9, 5)), RNG.normal(size=(9, 3))
    u, v = RNG.normal(size=(5, 3)), RNG.normal(size=(3, 3))
    per_b = [np.mean(np.sum((x @ u[:, :b] @ v[:b] - y) ** 2, -1)) for b in range(1, 4)]
    np.testing.assert_allclose(float(C.maestro_objective(u, v, x, y)), np.mean(per_b), rtol=1e-5)
    seen = set()
    for s in range(40):
        key = jax.random.key(s)
        b = int(C.sample_keep_rank(key, 3))
        assert 1 <= b <= 3
        seen.add(b)
        got = float(C.maestro_objective(u, v, x, y, key=key))
        np.testing.assert_allclose(got, per_b[b - 1], rtol=1e-5)
    assert seen == {1, 2, 3}


def _pca_data(n=1000, d=8):
    q, _ = np.linalg.qr(RNG.normal(size=(d, d)))
    sd = np.array([3.0, 2.2, 1.6, 1.1, 0.3, 0.2, 0.1, 0.05])
    x = (RNG.normal(size=(n, d)) * sd) @ q.T
    x -= x.mean(0)
    lam, vec = np.linalg.eigh(x.T @ x / n)
    return x, lam[::-1], vec[:, ::-1]


def test_linear_autoencoder_prefixes_are_pca():
    x, lam, vec = _pca_data()
    k = 4
    u, v, info = C.maestro_train(x, x, rank=k, steps=800, lr=0.04, ordered=True)
    u0, v0, info0 = C.maestro_train(x, x, rank=k, steps=800, lr=0.04, ordered=False)
    for b in range(1, k + 1):
        assert _angle_deg(v[:b].T, vec[:, :b]) < 2.0, b
        # the PCA prefix loss: the variance outside the top-b subspace
        np.testing.assert_allclose(info["prefix_loss"][b - 1], lam[b:].sum(), rtol=2e-2)
    # without ordered dropout: the full span is PCA's, the prefixes are not
    assert _angle_deg(v0.T, vec[:, :k]) < 2.0
    assert max(_angle_deg(v0[:b].T, vec[:, :b]) for b in range(1, k)) > 30.0
    assert max(info0["prefix_loss"][b - 1] / lam[b:].sum() for b in range(1, k)) > 1.5
    # the hierarchical cut keeps the first b (here a PCA model of rank 2)
    ub, vb, tinfo = C.maestro_truncate(u, v, rank=2)
    np.testing.assert_array_equal(ub, u[:, :2])
    np.testing.assert_array_equal(vb, v[:2])
    assert tinfo["rank"] == 2


def test_linear_regression_uniform_inputs_recovers_svd():
    i, o, k = 6, 5, 3
    uw, _ = np.linalg.qr(RNG.normal(size=(i, i)))
    vw, _ = np.linalg.qr(RNG.normal(size=(o, o)))
    w = (uw[:, :o] * np.array([3.0, 2.0, 1.2, 0.4, 0.1])) @ vw.T
    x = RNG.uniform(-np.sqrt(3), np.sqrt(3), size=(2000, i))  # isotropic, unit variance
    u, v, _ = C.maestro_train(x, x @ w, rank=k, steps=800, lr=0.05)
    uu, s, vt = np.linalg.svd(w, full_matrices=False)
    for b in range(1, k + 1):
        svd_b = (uu[:, :b] * s[:b]) @ vt[:b]
        err = np.linalg.norm(u[:, :b] @ v[:b] - svd_b) / np.linalg.norm(svd_b)
        assert err < 0.05, (b, err)


def test_truncate_by_tolerance_cuts_only_the_tail():
    u = np.eye(5, 4) * np.array([3.0, 0.01, 2.0, 0.01])
    v = np.eye(4, 6)
    ub, vb, info = C.maestro_truncate(u, v, tol=0.1)
    assert info["rank"] == 3  # the interior small component (index 1) stays
    np.testing.assert_allclose(info["importance"], [3.0, 0.01, 2.0, 0.01])
    np.testing.assert_allclose(info["error"], 0.01)
    assert C.maestro_truncate(u, v, tol=100.0)[2]["rank"] == 1
    with pytest.raises(ValueError, match="exactly one"):
        C.maestro_truncate(u, v)
    with pytest.raises(ValueError, match="rank=9"):
        C.maestro_truncate(u, v, rank=9)
    with pytest.raises(ValueError, match="rank=0"):
        C.maestro_train(np.ones((4, 3)), np.ones((4, 3)), rank=0, steps=1, lr=0.1)
