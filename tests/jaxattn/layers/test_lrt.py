"""Low-Rank Transformer of Greenformers (PAPERS.md §4): the ``lrt`` form, W ≈ B A from the
truncated SVD. Full rank reproduces the dense layer (fp32), the error is the discarded
spectrum (Eckart–Young), the parameter count is r (m + n)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import optim
from jaxattn.layers import Linear, SVDLowRankKernel, factorize

M, N, H = 12, 2, 5  # Linear (12,) -> (2, 5): the matrix view [12, 10]
X = jax.random.normal(jax.random.key(0), (3, 4, M))


def _dense():
    lin = Linear((M,), (N, H), axes=("embed", "heads", "head_dim"), rngs=nnx.Rngs(0))
    lin.kernel[...] = jax.random.normal(jax.random.key(3), (M, N, H))
    return lin


def test_full_rank_reproduces_the_dense_layer():
    lin = _dense()
    w = lin.as_matrix()
    want = lin(X)
    form = factorize(lin, "lrt", rank=None)  # r = min(m, n) = 10, no rngs needed
    assert isinstance(form, SVDLowRankKernel) and form.rank == 10 and lin.kernel is None
    assert form.b.shape == (M, 10) and form.a.shape == (10, N * H)
    np.testing.assert_allclose(lin.as_matrix(), w, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lin(X), want, atol=5e-5, rtol=1e-5)
    assert form.num_params() == 10 * (M + N * H) == optim.form_param_count("lrt", M, 10, rank=10)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_truncation_error_is_the_discarded_spectrum(rank):
    lin = _dense()
    w = np.asarray(lin.as_matrix(), np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    form = factorize(lin, "lrt", rank=rank)
    err = w - np.asarray(lin.as_matrix(), np.float64)
    np.testing.assert_allclose(np.linalg.norm(err), np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(err, 2), s[rank], rtol=1e-4)  # spectral: s_{r+1}
    assert form.num_params() == rank * (M + N * H)
    # the forward runs through the factors: (x B) A, never forming W
    b, a = form.b[...], form.a[...]
    want = ((X.reshape(-1, M) @ b) @ a).reshape(3, 4, N, H)
    np.testing.assert_allclose(lin(X), want, atol=1e-5, rtol=1e-5)
    # balanced factors: B = U √s, A = √s Vᵀ, so both carry the same singular values
    np.testing.assert_allclose(
        np.linalg.svd(np.asarray(b), compute_uv=False), np.sqrt(s[:rank]), rtol=1e-4
    )
    np.testing.assert_allclose(
        np.linalg.svd(np.asarray(a), compute_uv=False), np.sqrt(s[:rank]), rtol=1e-4
    )


def test_gradients_reach_both_factors_and_bad_rank_is_named():
    lin = _dense()
    factorize(lin, "lrt", rank=4)
    graphdef, params = nnx.split(lin, nnx.Param)
    g = jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(X))))(params)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))
    with pytest.raises(ValueError, match=r"rank=11 .* must be an int in \[1, min\(m, n\) = 10\]"):
        factorize(_dense(), "lrt", rank=11)
    with pytest.raises(ValueError, match="already factorised"):
        factorize(lin, "lrt", rank=2)
