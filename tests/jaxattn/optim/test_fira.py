"""Fira (jaxattn.optim.fira): PAPERS.md §8 faithful tests (full rank in test_galore.py)."""

import jax
import numpy as np
import optax

from jaxattn import optim


def _grads(t, scale=1.0):
    """fp32 numpy draws (eager jax.random compiles a program per shape)."""
    rng = np.random.default_rng(t)
    return {
        "wide": (scale * rng.standard_normal((24, 40))).astype(np.float32),  # left, R [r, 40]
        "tall": (scale * rng.standard_normal((40, 24))).astype(np.float32),  # right, R [40, r]
    }


def test_residual_is_scaled_by_the_inner_gain_and_the_limiter_caps_growth():
    gamma, r = 1.01, 4
    inner = optax.scale_by_adam()
    tx = optim.fira(inner, rank=r, update_proj_gap=3, scale=0.5, gamma=gamma)
    update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
    state = jax.jit(tx.init)(_grads(0))
    assert state.inner.mu["wide"].shape == (r, 40) and state.fira_norm["wide"].shape == ()
    zeros = {"wide": np.zeros((r, 40), np.float32), "tall": np.zeros((40, r), np.float32)}
    inner_state = jax.jit(inner.init)(zeros)
    norm = np.linalg.norm
    norms = []
    for t in range(6):  # the reference in numpy (fp32), beside the jitted steps
        g = _grads(t, scale=30.0 if t == 4 else 1.0)  # a spike at step 4
        u, state = update(g, state)
        u = jax.tree.map(np.asarray, u)
        p, q = np.asarray(state.left["wide"]), np.asarray(state.right["tall"])
        low = {"wide": p.T @ g["wide"], "tall": g["tall"] @ q.T}
        n_low, inner_state = inner_update(low, inner_state)
        n_low = jax.tree.map(np.asarray, n_low)
        # φ per column of R (left) / per row of R (right): the norm over R's rank axis
        phi_w = norm(n_low["wide"], axis=0) / (norm(low["wide"], axis=0) + 1e-8)
        phi_t = norm(n_low["tall"], axis=1) / (norm(low["tall"], axis=1) + 1e-8)
        s_w = (g["wide"] - p @ low["wide"]) * phi_w[None, :]
        s_t = (g["tall"] - low["tall"] @ q) * phi_t[:, None]
        got_w = u["wide"] - 0.5 * p @ n_low["wide"]  # what Fira adds to GaLore's update
        got_t = u["tall"] - 0.5 * n_low["tall"] @ q
        lam_w, lam_t = norm(s_w) / norm(got_w), norm(s_t) / norm(got_t)
        # the added term is the scaled residual, shrunk by the limiter λ >= 1 (exactly 1 at step 0)
        np.testing.assert_allclose(got_w * lam_w, s_w, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_t * lam_t, s_t, rtol=1e-4, atol=1e-6)
        assert lam_w >= 1 - 1e-5 and (t > 0 or abs(lam_w - 1) < 1e-5)
        np.testing.assert_allclose(float(state.fira_norm["wide"]), norm(got_w), rtol=1e-5)
        norms.append(float(state.fira_norm["wide"]))
        # the residual is outside the subspace: Pᵀ S = 0
        np.testing.assert_allclose(p.T @ got_w, 0, atol=1e-5)
    ratios = np.array(norms[1:]) / np.array(norms[:-1])
    assert np.all(ratios <= gamma * (1 + 1e-5)), ratios
    assert abs(ratios[3] - gamma) < 1e-4  # the spike was limited to exactly γ


def test_fira_is_full_rank_where_galore_is_not():
    g = _grads(0)
    galore = optim.galore(optax.scale_by_adam(), rank=4, update_proj_gap=2)
    fira = optim.fira(optax.scale_by_adam(), rank=4, update_proj_gap=2)
    ug, sg = jax.jit(lambda g: galore.update(g, galore.init(g)))(g)
    uf = jax.jit(lambda g: fira.update(g, fira.init(g))[0])(g)
    p, ug, uf = np.asarray(sg.left["wide"]), np.asarray(ug["wide"]), np.asarray(uf["wide"])
    out_g = ug - p @ (p.T @ ug)
    out_f = uf - p @ (p.T @ uf)
    assert np.abs(out_g).max() < 1e-5  # GaLore's update stays in the rank-4 subspace
    assert np.linalg.norm(out_f) > 0.5 * np.linalg.norm(uf)
    assert np.linalg.matrix_rank(uf) == 24
