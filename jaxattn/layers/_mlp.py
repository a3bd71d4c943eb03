"""SwiGLU feed-forward block (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._base import DTypeLike, cast, dense, param, zeros_init

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
        if d_model <= 0 or hidden_dim <= 0:
            raise ValueError(f"{d_model=} and {hidden_dim=} must be positive")
        self.dtype = dtype
        self.gate_DF = param(rngs, (d_model, hidden_dim), ("embed", "mlp"), dtype=param_dtype)
        self.up_DF = param(rngs, (d_model, hidden_dim), ("embed", "mlp"), dtype=param_dtype)
        self.down_FD = param(rngs, (hidden_dim, d_model), ("mlp", "embed"), dtype=param_dtype)
        self.use_bias = use_bias
        if use_bias:
            b = lambda n, ax: param(rngs, (n,), (ax,), init=zeros_init, dtype=param_dtype)
            self.gate_bias_F = b(hidden_dim, "mlp")
            self.up_bias_F = b(hidden_dim, "mlp")
            self.down_bias_D = b(d_model, "embed")

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        """Apply the MLP to ``x_BTD`` [B, T, D]; returns [B, T, D]."""
        dt = self.dtype or x_BTD.dtype
        x_BTD = x_BTD.astype(dt)
        gate_BTF = dense(x_BTD, cast(self.gate_DF[...], dt))
        up_BTF = dense(x_BTD, cast(self.up_DF[...], dt))
        if self.use_bias:
            gate_BTF = gate_BTF + cast(self.gate_bias_F[...], dt)
            up_BTF = up_BTF + cast(self.up_bias_F[...], dt)
        h_BTF = swiglu(gate_BTF, up_BTF)
        out_BTD = dense(h_BTF, cast(self.down_FD[...], dt))
        if self.use_bias:
            out_BTD = out_BTD + cast(self.down_bias_D[...], dt)
        return out_BTD
