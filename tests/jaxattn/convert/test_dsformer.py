"""DSFormer (PAPERS.md §9): N:M projection, the straight-through factor, the D·S fit.

Faithful tests: the projection keeps exactly N entries per group of M, the largest in
magnitude, along the asked axis; the straight-through factor's value is the masked S and its
gradient w.r.t. the dense latent equals the gradient w.r.t. the masked factor; the fitted S
satisfies the pattern, the product has W's shape, the fit lowers ‖W − D S‖ from its start, and on
generic (Gaussian) matrices beats the truncated SVD with the same number of stored values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)


def _groups(x, m, axis):
    t = np.moveaxis(np.asarray(x), axis, -1)
    return t.reshape(t.shape[0], -1, m)


@pytest.mark.parametrize("n,m,axis", [(2, 4, 0), (2, 4, 1), (1, 4, 0), (3, 8, 1)])
def test_nm_projection_keeps_top_n_per_group(n, m, axis):
    s = RNG.normal(size=(16, 24)).astype(np.float32)  # jnp without x64 computes in f32
    p = np.asarray(C.nm_project(s, n, m, axis=axis))
    mask = np.asarray(C.nm_mask(s, n, m, axis=axis))
    gs, gp, gm = _groups(s, m, axis), _groups(p, m, axis), _groups(mask, m, axis)
    assert (gm.sum(-1) == n).all()
    np.testing.assert_array_equal(p, np.where(mask, s, 0.0))
    # the kept ones are the n largest magnitudes of their group
    top = np.sort(np.abs(gs), -1)[..., ::-1]
    np.testing.assert_allclose(np.sort(np.abs(gp), -1)[..., ::-1][..., :n], top[..., :n])
    kept_min = np.where(gm, np.abs(gs), np.inf).min(-1)
    dropped_max = np.where(gm, -np.inf, np.abs(gs)).max(-1)
    assert (kept_min >= dropped_max).all()


def test_nm_ties_and_bad_input():
    mask = np.asarray(C.nm_mask(np.ones((4, 2)), 2, 4))
    assert mask.sum(0).tolist() == [2, 2] and mask[:2].all()  # ties: the earlier entries
    with pytest.raises(ValueError, match="multiple of m=4"):
        C.nm_mask(np.ones((6, 4)), 2, 4, axis=0)
    with pytest.raises(ValueError, match="n=5"):
        C.nm_project(np.ones((4, 4)), 5, 4)
    with pytest.raises(ValueError, match="multiple of m=4"):
        C.dsformer_fit(np.ones((8, 8)), k=6)


def test_ste_value_is_masked_gradient_is_dense():
    d = jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)
    s = jnp.asarray(RNG.normal(size=(8, 5)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(C.ste_nm(s, 2, 4)), np.asarray(C.nm_project(s, 2, 4)))

    def loss_ste(s_):
        return jnp.sum((w - d @ C.ste_nm(s_, 2, 4)) ** 2)

    def loss_masked(sm):
        return jnp.sum((w - d @ sm) ** 2)

    g_ste = jax.grad(loss_ste)(s)
    g_dense = jax.grad(loss_masked)(C.nm_project(s, 2, 4))
    np.testing.assert_allclose(np.asarray(g_ste), np.asarray(g_dense), rtol=1e-6, atol=1e-6)
    # the gradient reaches the pruned entries too (a plain mask would give them 0)
    pruned = ~np.asarray(C.nm_mask(s, 2, 4))
    assert np.abs(np.asarray(g_ste)[pruned]).min() > 0


def test_fit_pattern_and_beats_same_size_svd_on_generic_matrices():
    m_dim, n_dim, k = 16, 64, 16
    for seed in range(2):
        w = np.random.default_rng(seed).normal(size=(m_dim, n_dim))
        d, s, info = C.dsformer_fit(w, k=k, n=2, m=4)
        assert d.shape == (m_dim, k) and s.shape == (k, n_dim) and (d @ s).shape == w.shape
        assert (_groups(s != 0, 4, 0).sum(-1) <= 2).all()
        np.testing.assert_allclose(info["error"], np.linalg.norm(w - d @ s), rtol=1e-9)
        hist = [e for _, e in info["history"]]
        assert info["relative_error"] == pytest.approx(min(hist), rel=1e-4)
        assert min(hist) < 0.95 * hist[0]  # the STE fit improves on the projected SVD start
        p = info["params"]
        assert p == m_dim * k + k * n_dim // 2 == 768
        r = p // (m_dim + n_dim)  # truncated SVD storing at most as many values
        sv = np.linalg.svd(w, compute_uv=False)
        svd_rel = np.sqrt(np.sum(sv[r:] ** 2) / np.sum(sv**2))
        assert info["relative_error"] < 0.8 * svd_rel, (info["relative_error"], svd_rel)


def test_fit_zero_matrix_is_zero():
    d, s, info = C.dsformer_fit(np.zeros((8, 12)), k=4, steps=10, log_every=5)
    np.testing.assert_array_equal(d @ s, 0.0)
    assert info["error"] == 0.0 and info["relative_error"] == 0.0
