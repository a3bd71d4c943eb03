"""GradNormLoRP (weight normalisation + projected gradients) and W = BA refactorisation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattn import optim
from jaxattn.optim.quantized import QuantizedState


def test_weight_norm_reproduces_the_kernel_and_its_gradient_is_orthogonal_to_v():
    rng = np.random.default_rng(0)  # numpy draws, one jitted program (eager ops compile each)
    w = rng.standard_normal((3, 8, 12)).astype(np.float32)  # [*in, out], fan_in_axes=2
    x = rng.standard_normal((6, 3, 8)).astype(np.float32)

    @jax.jit
    def run(w, x):
        pair = optim.weight_norm_split(w, fan_in_axes=2)
        merge = lambda p: optim.weight_norm_merge(**p, fan_in_axes=2)  # noqa: E731
        loss = lambda p: jnp.sum(jnp.tanh(jnp.einsum("bij,ijo->bo", x, merge(p))))
        zero = optim.weight_norm_merge(jnp.ones(4), jnp.zeros((5, 4)))
        return pair, merge(pair), zero, jax.grad(loss)(pair)

    pair, merged, zero, grads = jax.tree.map(np.asarray, run(w, x))
    assert pair["g"].shape == (12,)
    np.testing.assert_allclose(merged, w, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(zero, 0.0)  # a zero column: zeros, not NaN
    # weight normalisation: the gradient of V is orthogonal to V, per output unit
    gv = grads["v"] * pair["v"]
    dots = np.sum(gv, axis=(0, 1)) / np.sum(np.abs(gv), axis=(0, 1))
    np.testing.assert_allclose(dots, 0, atol=1e-5)
    # the merged kernel is a plain dense layer: same output as the reparameterised forward
    np.testing.assert_allclose(
        np.einsum("bij,ijo->bo", x, merged), np.einsum("bij,ijo->bo", x, w), rtol=1e-5, atol=1e-5
    )


def test_gradnormlorp_projects_v_only_and_is_the_inner_at_full_rank():
    params = {
        "mlp": optim.weight_norm_split(jax.random.normal(jax.random.key(0), (16, 24))),
        "bias": jnp.zeros(24),
    }
    tx = optim.gradnormlorp(optax.scale_by_adam(), rank=4, update_proj_gap=2)
    state = tx.init(params)
    assert state.inner.mu["mlp"]["v"].shape == (4, 24) and state.inner.mu["mlp"]["g"].shape == (24,)
    full = optim.gradnormlorp(optax.scale_by_adam(), rank=16, update_proj_gap=2)
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
    u_full, _ = jax.jit(full.update)(g, full.init(params))
    u_adam, _ = jax.jit(optax.scale_by_adam().update)(g, optax.scale_by_adam().init(params))
    for a, b in zip(jax.tree.leaves(u_full), jax.tree.leaves(u_adam)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tx8 = optim.gradnormlorp(optax.scale_by_adam(), rank=4, update_proj_gap=2, moment_bits=8)
    assert isinstance(tx8.init(params).inner, QuantizedState)


def test_balance_factors_keeps_the_product_and_balances_the_spectrum():
    rng = np.random.default_rng(0)  # numpy draws and checks, one jitted balance_factors
    b = (rng.standard_normal((32, 6)) * 3.0).astype(np.float32)
    a = (rng.standard_normal((6, 20)) * 0.1).astype(np.float32)
    b2, a2 = (np.asarray(x) for x in jax.jit(optim.balance_factors)(b, a))
    np.testing.assert_allclose(b2 @ a2, b @ a, rtol=0, atol=1e-5 * np.abs(b @ a).max())
    btb, aat = b2.T @ b2, a2 @ a2.T
    np.testing.assert_allclose(btb, aat, atol=1e-4)
    s = np.linalg.svd(b @ a, compute_uv=False)[:6]
    np.testing.assert_allclose(np.diag(btb), s, rtol=1e-4)
    np.testing.assert_allclose(btb - np.diag(np.diag(btb)), 0, atol=1e-4)


def test_refactor_every_k_steps_keeps_ba_and_resets_the_moments():
    rng = np.random.default_rng(0)  # numpy draws: no eager jax.random programs
    normal = lambda shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    params = {"q": {"b": normal((16, 4)), "a": normal((4, 24))}, "norm": np.ones(8, np.float32)}
    params = jax.tree.map(jnp.asarray, params)
    inner = optax.adam(1e-2)
    tx = optim.lowrank_refactor(inner, every=3)
    state = jax.jit(tx.init)(params)
    step, plain_step = jax.jit(tx.update), jax.jit(inner.update)
    for t in range(1, 7):
        g = jax.tree.map(lambda p: normal(p.shape), params)
        want_u, want_inner = plain_step(g, state.inner, params)  # the plain Adam step
        u, state = step(g, state, params)
        new = optax.apply_updates(params, u)
        plain = optax.apply_updates(params, want_u)
        if t % 3 == 0:  # refactored: same product, balanced factors, fresh optimizer
            prod = plain["q"]["b"] @ plain["q"]["a"]
            np.testing.assert_allclose(
                np.asarray(new["q"]["b"] @ new["q"]["a"]),
                np.asarray(prod),
                atol=2e-5 * float(jnp.abs(prod).max()),
            )
            assert not np.allclose(np.asarray(new["q"]["b"]), np.asarray(plain["q"]["b"]))
            mu = state.inner[0].mu
            assert int(state.inner[0].count) == 0
            assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(mu))
            np.testing.assert_allclose(
                np.asarray(new["norm"]), np.asarray(plain["norm"]), atol=1e-7
            )
        else:  # an ordinary Adam step
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want_u)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
            assert int(state.inner[0].count) == int(want_inner[0].count)
        params = new
    assert int(state.count) == 6
