"""Hydra: a parallel and a sequential low-rank branch on one projection.

Kim, Yang, Kim, Hong, Park, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning" (2023, arXiv:2309.06922). With the frozen weight W₀ (d_out×d_in) the paper's
adapted layer is

    h = W₀x + B_P A_P x + W₀ B_S A_S x,

a parallel (LoRA) branch B_P A_P that learns new features and a sequential branch whose output
W₀(B_S A_S x) is a linear combination of the pre-trained features (the columns of W₀). Both are
linear, so ΔW = B_P A_P + W₀ B_S A_S merges into one weight.

Here, in the [*in, *out] kernel layout of ``Linear`` (y = x·K, K = W₀ᵀ), with s = alpha / rank:

    Δy = s_p·(x·a_p)·b_p + s_s·((x·a_s)·b_s)·K
    ΔK = s_p·a_p·b_p + s_s·(a_s·b_s)·K

with a_p [*in, r], b_p [r, *out] (zero), a_s [*in, r_s], b_s [r_s, *in] (zero), so the adapter
starts as an exact no-op. Trainable count: r·(d_in + d_out) + 2·r_s·d_in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import Linear
from jaxattn.lowrank._factors import RANK_AXIS, factor, kernel_axes
from jaxattn.lowrank._registry import MethodConfig, register_method
from jaxattn.lowrank.methods._seeds_common import check_rank, contract, down_init, outer

__all__ = ["HydraConfig", "HydraAdapter"]


@register_method("hydra")
@dataclasses.dataclass(frozen=True)
class HydraConfig(MethodConfig):
    """Hydra's hyper-parameters.

    Attributes:
      rank: rank r of the parallel branch, 1 <= r <= min(d_in, d_out).
      alpha: parallel scale numerator (scale alpha / rank).
      seq_rank: rank r_s of the sequential branch, 1 <= r_s <= d_in (None: ``rank``).
      seq_alpha: sequential scale numerator (None: ``alpha``; scale seq_alpha / seq_rank).
    """

    rank: int = 8
    alpha: float = 8.0
    seq_rank: int | None = None
    seq_alpha: float | None = None

    def _seq(self) -> tuple[int, float]:
        r = self.rank if self.seq_rank is None else self.seq_rank
        a = self.alpha if self.seq_alpha is None else self.seq_alpha
        return r, a

    def validate(self, path: str, linear: Linear) -> None:
        check_rank(path, linear, self.rank, min(linear.fan_in, linear.fan_out))
        check_rank(path, linear, self._seq()[0], linear.fan_in, name="seq_rank")

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> HydraAdapter:
        self.validate(path, linear)
        r_s, a_s = self._seq()
        return HydraAdapter(linear, self.rank, self.alpha / self.rank, r_s, a_s / r_s, rngs=rngs)


class HydraAdapter(nnx.Module):
    """The Hydra adapter of one ``Linear`` (see the module docstring for the formula).

    Params (fp32 ``AdapterParam``): ``a_p`` [*in, r], ``b_p`` [r, *out], ``a_s`` [*in, r_s],
    ``b_s`` [r_s, *in].
    """

    def __init__(self, linear: Linear, rank, scale, seq_rank, seq_scale, *, rngs: nnx.Rngs):
        in_ax, out_ax = kernel_axes(linear)
        ins, outs = linear.in_shape, linear.out_shape
        self.n_in = len(ins)
        self.scale = float(scale)
        self.seq_scale = float(seq_scale)
        self.a_p = factor(down_init(rngs.params(), ins, rank), in_ax + (RANK_AXIS,))
        self.b_p = factor(jnp.zeros((rank,) + outs), (RANK_AXIS,) + out_ax)
        self.a_s = factor(down_init(rngs.params(), ins, seq_rank), in_ax + (RANK_AXIS,))
        self.b_s = factor(jnp.zeros((seq_rank,) + ins), (RANK_AXIS,) + in_ax)

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` [..., *out] of ``x`` [..., *in] (compute dtype = x's); ``base`` K [*in, *out]."""
        par = contract(contract(x, self.a_p[...], self.n_in), self.b_p[...], 1)
        z = contract(contract(x, self.a_s[...], self.n_in), self.b_s[...], 1)  # [..., *in]
        seq = contract(z, base, self.n_in)
        return jnp.asarray(self.scale, x.dtype) * par + jnp.asarray(self.seq_scale, x.dtype) * seq

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` [*in, *out] = s_p·a_p·b_p + s_s·(a_s·b_s)·K, in fp32."""
        m = outer(self.a_s[...], self.b_s[...])  # [*in, *in]
        seq = jnp.tensordot(m, base.astype(jnp.float32), self.n_in)
        return self.scale * outer(self.a_p[...], self.b_p[...]) + self.seq_scale * seq
