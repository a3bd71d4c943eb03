"""RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._base import DTypeLike, ones_init, param
from jaxattn.layers._validate import check_float, check_int

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """Root-mean-square normalisation over the last axis.

    Args:
      x_BTD: input [..., D] in any float dtype.
      scale_D: learned scale [D].
      eps: added to the mean square.

    Returns:
      [..., D] in x's dtype.
    """
    # statistics in fp32: bf16 loses the small mean-square terms.
    x32 = x_BTD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # Hugging Face order: normalise in fp32, cast back, then scale.
    return scale_D.astype(x_BTD.dtype) * normed.astype(x_BTD.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale (initialised to ones).

    Args:
      dim: size of the normalised axis.
      eps: numerical floor added to the mean square.
      axis_name: logical axis name of the scale (``"norm"``; ``"head_dim"`` for qk-norm).
      param_dtype: dtype of the scale.
      rngs: parameter RNGs.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        axis_name: str = "norm",
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_int("RMSNorm", "dim", dim)
        self.eps = check_float("RMSNorm", "eps", eps)
        self.scale = param(rngs, (dim,), (axis_name,), init=ones_init, dtype=param_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        """Normalise ``x_BTD`` [..., D]; returns [..., D] in x's dtype."""
        return rms_norm(x_BTD, self.scale[...], self.eps)
