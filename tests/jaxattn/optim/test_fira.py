"""Fira (jaxattn.optim.fira): PAPERS.md §8 faithful tests (full rank in test_galore.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattn import optim


def _grads(t, scale=1.0):
    k1, k2 = jax.random.split(jax.random.key(t))
    return {
        "wide": scale * jax.random.normal(k1, (24, 40)),  # left projection, R [r, 40]
        "tall": scale * jax.random.normal(k2, (40, 24)),  # right projection, R [40, r]
    }


def test_residual_is_scaled_by_the_inner_gain_and_the_limiter_caps_growth():
    gamma, r = 1.01, 4
    inner = optax.scale_by_adam()
    tx = optim.fira(inner, rank=r, update_proj_gap=3, scale=0.5, gamma=gamma)
    update = jax.jit(tx.update)
    state = tx.init(_grads(0))
    assert state.inner.mu["wide"].shape == (r, 40) and state.fira_norm["wide"].shape == ()
    inner_state = inner.init({"wide": jnp.zeros((r, 40)), "tall": jnp.zeros((40, r))})
    norms = []
    for t in range(6):
        g = _grads(t, scale=30.0 if t == 4 else 1.0)  # a spike at step 4
        u, state = update(g, state)
        p, q = state.left["wide"], state.right["tall"]
        low = {"wide": p.T @ g["wide"], "tall": g["tall"] @ q.T}
        n_low, inner_state = inner.update(low, inner_state)
        # φ per column of R (left) / per row of R (right): the norm over R's rank axis
        phi_w = jnp.linalg.norm(n_low["wide"], axis=0) / (
            jnp.linalg.norm(low["wide"], axis=0) + 1e-8
        )
        phi_t = jnp.linalg.norm(n_low["tall"], axis=1) / (
            jnp.linalg.norm(low["tall"], axis=1) + 1e-8
        )
        s_w = (g["wide"] - p @ low["wide"]) * phi_w[None, :]
        s_t = (g["tall"] - low["tall"] @ q) * phi_t[:, None]
        got_w = u["wide"] - 0.5 * p @ n_low["wide"]  # what Fira adds to GaLore's update
        got_t = u["tall"] - 0.5 * n_low["tall"] @ q
        lam_w = jnp.linalg.norm(s_w) / jnp.linalg.norm(got_w)
        lam_t = jnp.linalg.norm(s_t) / jnp.linalg.norm(got_t)
        # the added term is the scaled residual, shrunk by the limiter λ >= 1 (exactly 1 at step 0)
        np.testing.assert_allclose(np.asarray(got_w * lam_w), np.asarray(s_w), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_t * lam_t), np.asarray(s_t), rtol=1e-4, atol=1e-6)
        assert float(lam_w) >= 1 - 1e-5 and (t > 0 or abs(float(lam_w) - 1) < 1e-5)
        np.testing.assert_allclose(
            float(state.fira_norm["wide"]), float(jnp.linalg.norm(got_w)), rtol=1e-5
        )
        norms.append(float(state.fira_norm["wide"]))
        # the residual is outside the subspace: Pᵀ S = 0
        np.testing.assert_allclose(np.asarray(p.T @ got_w), 0, atol=1e-5)
    ratios = np.array(norms[1:]) / np.array(norms[:-1])
    assert np.all(ratios <= gamma * (1 + 1e-5)), ratios
    assert abs(ratios[3] - gamma) < 1e-4  # the spike was limited to exactly γ


def test_fira_is_full_rank_where_galore_is_not():
    g = _grads(0)
    galore = optim.galore(optax.scale_by_adam(), rank=4, update_proj_gap=2)
    fira = optim.fira(optax.scale_by_adam(), rank=4, update_proj_gap=2)
    ug, sg = jax.jit(galore.update)(g, galore.init(g))
    uf, _ = jax.jit(fira.update)(g, fira.init(g))
    p = sg.left["wide"]
    out_g = ug["wide"] - p @ (p.T @ ug["wide"])
    out_f = uf["wide"] - p @ (p.T @ uf["wide"])
    assert float(jnp.abs(out_g).max()) < 1e-5  # GaLore's update stays in the rank-4 subspace
    assert float(jnp.linalg.norm(out_f)) > 0.5 * float(jnp.linalg.norm(uf["wide"]))
    assert np.linalg.matrix_rank(np.asarray(uf["wide"])) == 24
