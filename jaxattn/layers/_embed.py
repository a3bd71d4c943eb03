"""Token embedding with an optional tied unembedding (logits = x @ table^T)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._base import DTypeLike, cast, param

__all__ = ["Embed"]


class Embed(nnx.Module):
    """Lookup table [vocab, D]; ``attend`` reuses it as the output projection (tied weights).

    Args:
      vocab_size: number of tokens V.
      d_model: model width D.
      dtype: compute dtype of the looked-up vectors (None: the parameter dtype).
      param_dtype: parameter dtype.
      rngs: parameter RNGs.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if vocab_size <= 0 or d_model <= 0:
            raise ValueError(f"{vocab_size=} and {d_model=} must be positive")
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.table_VD = param(rngs, (vocab_size, d_model), ("vocab", "embed"), dtype=param_dtype)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """Embed int tokens [B, T]; returns x_BTD."""
        if not jnp.issubdtype(jnp.asarray(tokens_BT).dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got dtype {jnp.asarray(tokens_BT).dtype}")
        return cast(jnp.take(self.table_VD[...], tokens_BT, axis=0), self.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Tied unembedding: logits_BTV = x_BTD @ table_VD^T (in x's dtype)."""
        return jnp.einsum("btd,vd->btv", x_BTD, self.table_VD[...].astype(x_BTD.dtype))
