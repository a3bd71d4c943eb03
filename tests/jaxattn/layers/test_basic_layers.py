"""RMSNorm, SwiGLU and Embed against their formulas; logical axes on parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import Embed, RMSNorm, SwiGLU
from jaxattn.layers._mlp import swiglu

X = jax.random.normal(jax.random.key(0), (2, 5, 16))


def test_rmsnorm_formula_and_dtype():
    norm = RMSNorm(16, eps=1e-5, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.arange(16.0)
    ref = X / np.sqrt(np.mean(np.square(X), -1, keepdims=True) + 1e-5) * np.arange(16.0)
    np.testing.assert_allclose(norm(X), ref, rtol=1e-5, atol=1e-6)
    assert norm(X.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert norm.scale.get_metadata()["out_sharding"] == ("norm",)


def test_swiglu_formula():
    mlp = SwiGLU(16, 24, use_bias=True, rngs=nnx.Rngs(0))
    h = jax.nn.silu(X @ mlp.gate.kernel[...] + mlp.gate.bias[...]) * (X @ mlp.up.kernel[...])
    np.testing.assert_allclose(mlp(X), h @ mlp.down.kernel[...], atol=1e-5)
    assert mlp.gate.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    with pytest.raises(ValueError, match="hidden_dim"):
        SwiGLU(16, 0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_swiglu_custom_vjp_equals_autodiff(dtype, tol):
    """The fused gate's hand-written backward against autodiff of silu(g) * u, including
    gates far in both tails (sigmoid saturated)."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    g = jax.random.normal(k1, (3, 7, 24)) * 4.0
    g = g.at[0, 0, :4].set(jnp.array([-90.0, -30.0, 30.0, 90.0]))
    u = jax.random.normal(k2, (3, 7, 24))
    dh = jax.random.normal(k3, (3, 7, 24))
    g, u, dh = (x.astype(dtype) for x in (g, u, dh))
    ref = lambda g, u: jax.nn.silu(g) * u
    out, vjp = jax.vjp(swiglu, g, u)
    out_ref, vjp_ref = jax.vjp(ref, g, u)
    assert out.dtype == dtype
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(f32(out), f32(out_ref), rtol=tol, atol=tol)
    for got, want in zip(vjp(dh), vjp_ref(dh), strict=True):
        assert got.dtype == dtype
        assert np.all(np.isfinite(f32(got)))
        np.testing.assert_allclose(f32(got), f32(want), rtol=tol, atol=tol * 4)


def test_embed_lookup_and_tied_unembedding():
    emb = Embed(11, 16, rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 2, 10]])
    np.testing.assert_array_equal(emb(tokens), emb.table[...][tokens])
    np.testing.assert_allclose(emb.as_head()(X), X @ emb.table[...].T, atol=1e-5)
    assert emb.table.get_metadata()["out_sharding"] == ("vocab", "embed")
    with pytest.raises(ValueError, match="integers"):
        emb(jnp.zeros((1, 2)))
