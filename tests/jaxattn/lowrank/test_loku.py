"""LoKU: the inverted hinge loss 1 + p(x_t) − max_{v≠x_t} p(v) and its gradient against numpy;
the empirical Fisher against a hand-computed one; FILA reconstructs W at full rank, is the
truncated SVD under uniform importance, beats the plain SVD on the Fisher-weighted error at
rank r; ``fila_apply`` leaves the model's outputs unchanged at init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import Linear
from jaxattn.lowrank import loku

RNG = np.random.default_rng  # numpy draws: no per-shape device compiles


def _np_ihl(z, t, m):
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    b, tt, v = z.shape
    val, grad = np.zeros((b, tt)), np.zeros_like(p)
    for i in range(b):
        for j in range(tt):
            pi, ti = p[i, j], t[i, j]
            other = np.where(np.arange(v) == ti, -np.inf, pi)
            o = int(np.argmax(other))
            val[i, j] = 1 + pi[ti] - pi[o]
            e_t, e_o = np.eye(v)[ti], np.eye(v)[o]
            grad[i, j] = pi[ti] * (e_t - pi) - pi[o] * (e_o - pi)  # softmax Jacobian
    n = m.sum()
    return (val * m).sum() / n, grad * m[..., None] / n


def test_ihl_value_and_gradient_match_numpy():
    z = RNG(0).standard_normal((2, 3, 5)).astype(np.float32).astype(np.float64) * 2
    t = np.array([[0, 4, 2], [1, 1, 3]])
    m = np.array([[1, 1, 0], [1, 0, 1]], np.float64)
    want, want_g = _np_ihl(z, t, m)
    f = lambda zz: loku.inverted_hinge_loss(zz, jnp.asarray(t), jnp.asarray(m))  # noqa: E731
    val, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(z, jnp.float32))  # one fwd+bwd compile
    np.testing.assert_allclose(val, want, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        loku.inverted_hinge_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


def test_empirical_fisher_is_mean_squared_gradient():
    w = jnp.asarray(RNG(1).standard_normal(3, np.float32))
    xs = [(jnp.asarray(RNG(10 + i).standard_normal(3, np.float32)), float(i)) for i in range(4)]
    f = loku.empirical_fisher(lambda p, e: (e[0] @ p - e[1]) ** 2, w, xs)
    want = np.mean(
        [(2 * (np.asarray(x) @ np.asarray(w) - y) * np.asarray(x)) ** 2 for x, y in xs], 0
    )
    np.testing.assert_allclose(f, want, rtol=1e-5)


@pytest.fixture(scope="module")
def problem():
    rng = RNG(2)
    w = jnp.asarray(rng.standard_normal((12, 8), np.float32))
    f_forget = jnp.asarray(rng.uniform(size=(12, 8)).astype(np.float32) ** 4)
    f_retain = jnp.asarray(rng.uniform(size=(12, 8)).astype(np.float32) + 0.1)
    return w, loku.relative_fisher(f_forget, f_retain)


def test_fila_full_rank_uniform_and_weighted_optimality(problem):
    w, imp = problem
    a, b, w_res = loku.fila_factors(w, imp, 8, alpha=16.0)
    np.testing.assert_allclose(2.0 * a @ b, w, rtol=1e-4, atol=1e-4)  # s = 16 / 8
    np.testing.assert_allclose(w_res, 0, atol=1e-4)
    u, s, vh = np.linalg.svd(np.asarray(w), full_matrices=False)
    svd3 = (u[:, :3] * s[:3]) @ vh[:3]
    a, b, _ = loku.fila_factors(w, jnp.ones_like(w), 3)
    np.testing.assert_allclose(a @ b, svd3, rtol=1e-4, atol=1e-4)
    a, b, w_res = loku.fila_factors(w, imp, 3)
    np.testing.assert_allclose(w_res + a @ b, w, rtol=1e-5, atol=1e-5)
    e_fila = float(loku.weighted_error(w, a @ b, imp))
    e_svd = float(loku.weighted_error(w, svd3, imp))
    assert e_fila < 0.95 * e_svd, (e_fila, e_svd)


def test_fila_apply_keeps_outputs_and_validates(problem):
    _, imp = problem

    class Two(nnx.Module):
        def __init__(self):
            self.p = Linear((12,), (8,), axes=(None, None), rngs=nnx.Rngs(0))
            self.q = Linear((8,), (2, 6), axes=(None, None, None), rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.q(self.p(x))

    m = nnx.jit(Two)()  # one compiled init, one compiled forward per structure
    fwd = nnx.jit(lambda m, x: m(x))
    x = RNG(4).standard_normal((3, 12), np.float32)
    before = np.asarray(fwd(m, x))
    w0 = np.asarray(m.p.kernel[...])
    imp_q = jnp.asarray(RNG(5).uniform(size=(8, 2, 6)).astype(np.float32))
    paths = loku.fila_apply(m, {"p": imp, "q": imp_q}, rank=2)
    assert sorted(paths) == ["p", "q"]
    np.testing.assert_allclose(np.asarray(fwd(m, x)), before, rtol=1e-4, atol=1e-4)
    a, b, w_res = loku.fila_factors(jnp.asarray(w0), imp, 2)
    ad = m.p.adapter.adapters["default"]
    np.testing.assert_allclose(np.asarray(ad.a[...]), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ad.b[...]), b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.p.kernel[...]), w_res, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        loku.fila_factors(jnp.ones((4, 3)), jnp.ones((4, 3)), 4)
    with pytest.raises(ValueError, match="no projection"):
        loku.fila_apply(Two(), {"z": imp}, rank=2)
