"""SwiGLU feed-forward block (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._base import DTypeLike
from jaxattn.layers._linear import Linear
from jaxattn.layers._validate import check_int

__all__ = ["SwiGLU", "swiglu"]


@jax.custom_vjp
def swiglu(gate, up):
    """``silu(gate) * up`` with a backward that recomputes the sigmoid.

    Autodiff of ``jax.nn.silu(g) * u`` saves sigmoid(g) and silu(g) as extra [B, T, F]
    residuals and spends separate elementwise passes on them; here the forward is one pass
    over (g, u) and the backward one pass over (g, u, dh) giving (dg, du): with
    s = sigmoid(g), d/dg = u·s·(1 + g·(1 − s)), d/du = g·s.
    """
    return gate * jax.nn.sigmoid(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dh):
    gate, up = res
    # the sigmoid in fp32 for low-precision inputs, like jax.nn.silu's
    g = jax.lax.optimization_barrier(gate).astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    dh32 = dh.astype(jnp.float32)
    dg = dh32 * up.astype(jnp.float32) * s * (1.0 + g * (1.0 - s))
    du = dh32 * g * s
    return dg.astype(gate.dtype), du.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nnx.Module):
    """Gated MLP with SiLU gate, as in Llama, Qwen2, Mistral and DeepSeek dense layers.

    Projections (``Linear``): gate [D, F] and up [D, F] (embed, mlp), down [F, D] (mlp, embed);
    parameter paths ``gate/kernel``, ``up/kernel``, ``down/kernel`` (+ ``bias``).

    Args:
      d_model: model width D.
      hidden_dim: MLP width F.
      use_bias: add biases to the three projections.
      dtype: compute dtype (None: the input's dtype).
      param_dtype: parameter dtype.
      rngs: parameter RNGs.
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        *,
        use_bias: bool = False,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value in (("d_model", d_model), ("hidden_dim", hidden_dim)):
            check_int("SwiGLU", name, value)
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear((d_model,), (hidden_dim,), axes=("embed", "mlp"), **common)
        self.up = Linear((d_model,), (hidden_dim,), axes=("embed", "mlp"), **common)
        self.down = Linear((hidden_dim,), (d_model,), axes=("mlp", "embed"), **common)

    def __call__(self, x_BTD: jax.Array, ctx=None) -> jax.Array:
        """Apply the MLP to ``x_BTD`` [B, T, D] (ctx: the call context); returns [B, T, D]."""
        h_BTF = swiglu(self.gate(x_BTD, ctx), self.up(x_BTD, ctx))
        return self.down(h_BTF, ctx)
