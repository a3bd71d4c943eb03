"""LoRD (PAPERS.md §9): one-shot SVD factorisation of linear layers.

Faithful tests: the rank-k factorisation error equals the Eckart–Young optimum (truncated SVD);
the parameter count k (m + n) is below m n exactly when k < m n / (m + n); the factorised layer
(a ``Linear`` in its ``lowrank`` form) computes x A B + b and passes a gradient check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from jaxattn import convert as C
from jaxattn.layers import Linear

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(16, 12), (12, 16), (10, 10)])
def test_error_is_eckart_young(shape):
    w = RNG.normal(size=shape)
    s = np.linalg.svd(w, compute_uv=False)
    for k in range(1, min(shape) + 1):
        a, b, info = C.lord(w, rank=k)
        assert a.shape == (shape[0], k) and b.shape == (k, shape[1])
        optimum = np.sqrt((s[k:] ** 2).sum())
        np.testing.assert_allclose(np.linalg.norm(w - a @ b), optimum, atol=1e-10)
        np.testing.assert_allclose(info["error"], optimum, atol=1e-10)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)  # full rank: exact


def test_parameter_count_and_break_even():
    for m, n in [(16, 12), (10, 10), (7, 3), (4096, 11008), (1, 5), (2, 2)]:
        kmax = C.lord_max_rank(m, n)
        for k in range(1, min(m, n) + 1):
            saves = k * (m + n) < m * n
            assert saves == (k < m * n / (m + n)) == (k <= kmax)
        if min(m, n) <= 50:
            w = RNG.normal(size=(m, n))
            for k in range(1, min(m, n) + 1):
                info = C.lord(w, rank=k)[2]
                assert info["params_factored"] == k * (m + n) and info["params_dense"] == m * n
                assert info["saves"] == (k <= kmax)
    assert C.lord_max_rank(10, 10) == 4  # 5 · 20 = 100 is no saving
    assert C.lord_max_rank(2, 2) == 0


def test_rank_reduction_rule():
    assert C.lord_rank(16, 12, 0.0) == 12
    assert C.lord_rank(16, 12, 0.5) == 6
    assert C.lord_rank(8, 8, 0.5) == 4
    assert C.lord_rank(6144, 24576, 0.3958) == 3712  # the paper's 39.58% on a StarCoder MLP
    assert C.lord_rank(4, 4, 0.99) == 1
    info = C.lord(RNG.normal(size=(16, 12)), reduction=0.5)[2]
    assert info["rank"] == 6 and info["saves"]


def _linear(m, n, *, bias):
    lin = Linear((m,), (n,), axes=(None, None), use_bias=bias, rngs=nnx.Rngs(1))
    if bias:
        lin.bias.set_value(jnp.asarray(RNG.normal(size=n), jnp.float32))
    return lin


def test_factorised_linear_forward_and_gradients():
    m, n, k = 16, 12, 5
    lin = _linear(m, n, bias=True)
    w = np.asarray(lin.as_matrix(), np.float64)
    bias = np.asarray(lin.bias[...], np.float64)
    a, b, _ = C.lord(w, rank=k)
    info = C.lord_linear(lin, rank=k)
    assert lin.kernel is None and lin.form.name == "lowrank" and lin.form.rank == k
    assert lin.form.num_params() == info["params_factored"] == k * (m + n)
    x = jnp.asarray(RNG.normal(size=(3, 4, m)), jnp.float32)
    np.testing.assert_allclose(lin(x), np.asarray(x) @ a @ b + bias, atol=1e-4)
    np.testing.assert_allclose(lin.as_matrix(), a @ b, atol=1e-5)
    # gradients of the factorised layer: analytic, and a finite-difference check
    graph, params = nnx.split(lin, nnx.Param)
    target = jnp.asarray(RNG.normal(size=(3, 4, n)), jnp.float32)

    def loss(p):
        return 0.5 * jnp.sum((nnx.merge(graph, p)(x) - target) ** 2)

    g = jax.grad(loss)(params)
    r = np.asarray(lin(x) - target).reshape(-1, n)
    xf = np.asarray(x).reshape(-1, m)
    fa, fb = np.asarray(lin.form.b[...]), np.asarray(lin.form.a[...])
    np.testing.assert_allclose(g["form"]["b"][...], xf.T @ r @ fb.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g["form"]["a"][...], (xf @ fa).T @ r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g["bias"][...], r.sum(0), rtol=1e-4, atol=1e-4)
    check_grads(loss, (params,), order=1, modes=["rev"], eps=1e-2, atol=5e-2, rtol=5e-2)


def test_bad_input():
    w = RNG.normal(size=(10, 10))
    with pytest.raises(ValueError, match="exactly one"):
        C.lord(w)
    with pytest.raises(ValueError, match="rank"):
        C.lord(w, rank=11)
    with pytest.raises(ValueError, match="reduction"):
        C.lord(w, reduction=1.0)
    with pytest.raises(ValueError, match="w_IO"):
        C.lord(w[0], rank=1)
    with pytest.raises(ValueError, match="saves no parameters.*k <= 4"):
        C.lord_linear(_linear(10, 10, bias=False), rank=5, path="mlp/up")
    lin = _linear(10, 10, bias=False)
    C.lord_linear(lin, rank=2)
    with pytest.raises(ValueError, match="no dense kernel"):
        C.lord_linear(lin, rank=2)
