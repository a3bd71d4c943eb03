"""RMSNorm, SwiGLU and Embed against their formulas; logical axes on parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import Embed, RMSNorm, SwiGLU

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
    h = jax.nn.silu(X @ mlp.gate_DF[...] + mlp.gate_bias_F[...]) * (X @ mlp.up_DF[...])
    np.testing.assert_allclose(mlp(X), h @ mlp.down_FD[...], atol=1e-5)
    assert mlp.gate_DF.get_metadata()["out_sharding"] == ("embed", "mlp")
    with pytest.raises(ValueError, match="hidden_dim"):
        SwiGLU(16, 0, rngs=nnx.Rngs(0))


def test_embed_lookup_and_tied_unembedding():
    emb = Embed(11, 16, rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 2, 10]])
    np.testing.assert_array_equal(emb(tokens), emb.table_VD[...][tokens])
    np.testing.assert_allclose(emb.attend(X), X @ emb.table_VD[...].T, atol=1e-5)
    assert emb.table_VD.get_metadata()["out_sharding"] == ("vocab", "embed")
    with pytest.raises(ValueError, match="integers"):
        emb(jnp.zeros((1, 2)))
