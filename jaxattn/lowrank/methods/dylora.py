"""DyLoRA: one LoRA trained for every rank up to r_max by sampling a rank each step.

Valipour, Rezagholizadeh, Kobyzev, Ghodsi, "DyLoRA: Parameter Efficient Tuning of
Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation" (EACL 2023,
arXiv:2210.07558). Each training step samples b ~ U{min_rank, ..., r_max} and the update uses
only the first b components of the factors (nested ranks):

    Δy = (alpha / b) · (x·a[..., :b])·b[:b]            ΔK_b = (alpha / b) · a[..., :b]·b[:b]

with a [*in, r_max] (LoRA init) and b [r_max, *out] (zero: an exact no-op at start). The
truncation is a rank mask over the fixed r_max-shaped factors, so shapes never change under
jit and components past b get exactly zero gradient in that step. b is drawn from ``ctx.rng``
itself (not ``ctx.key``), so every adapted layer of one step uses the same b; with no rng
(evaluation, generation) the rank is ``eval_rank`` (default r_max), and ``delta_kernel``
merges at ``eval_rank``. At b = r_max it is LoRA with scale alpha / r_max. (The paper's
optional "frozen" mode, which updates only the b-th component, is not implemented.)
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

__all__ = ["DyLoRAConfig", "DyLoRAAdapter", "sample_rank"]


def sample_rank(rng: jax.Array, min_rank: int, max_rank: int) -> jax.Array:
    """The step's rank b ~ U{min_rank, ..., max_rank} (int32 scalar) drawn from ``rng``."""
    return jax.random.randint(rng, (), min_rank, max_rank + 1, dtype=jnp.int32)


@register_method("dylora")
@dataclasses.dataclass(frozen=True)
class DyLoRAConfig(MethodConfig):
    """DyLoRA's hyper-parameters.

    Attributes:
      rank: r_max, 1 <= r_max <= min(d_in, d_out).
      alpha: scale numerator (scale alpha / b for the active rank b).
      min_rank: the smallest sampled rank, 1 <= min_rank <= rank.
      eval_rank: the rank used with no rng and when merging (None: ``rank``).
    """

    rank: int = 8
    alpha: float = 8.0
    min_rank: int = 1
    eval_rank: int | None = None

    def validate(self, path: str, linear: Linear) -> None:
        check_rank(path, linear, self.rank, min(linear.fan_in, linear.fan_out))
        check_rank(path, linear, self.min_rank, self.rank, name="min_rank")
        if self.eval_rank is not None:
            check_rank(path, linear, self.eval_rank, self.rank, name="eval_rank")

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> DyLoRAAdapter:
        self.validate(path, linear)
        ev = self.rank if self.eval_rank is None else self.eval_rank
        return DyLoRAAdapter(linear, self.rank, self.alpha, self.min_rank, ev, rngs=rngs)


class DyLoRAAdapter(nnx.Module):
    """The DyLoRA adapter of one ``Linear``: ``a`` [*in, r_max], ``b`` [r_max, *out] (fp32
    ``AdapterParam``), used at a rank b (see the module docstring)."""

    def __init__(self, linear: Linear, rank, alpha, min_rank, eval_rank, *, rngs: nnx.Rngs):
        in_ax, out_ax = kernel_axes(linear)
        self.n_in = len(linear.in_shape)
        self.rank, self.alpha = int(rank), float(alpha)
        self.min_rank, self.eval_rank = int(min_rank), int(eval_rank)
        self.a = factor(down_init(rngs.params(), linear.in_shape, rank), in_ax + (RANK_AXIS,))
        self.b = factor(jnp.zeros((rank,) + linear.out_shape), (RANK_AXIS,) + out_ax)

    def active_rank(self, ctx) -> jax.Array | int:
        """b for this call: sampled from ``ctx.rng`` when training, else ``eval_rank``."""
        rng = getattr(ctx, "rng", None)
        if rng is None:
            return self.eval_rank
        return sample_rank(rng, self.min_rank, self.rank)

    def _masked(self, rank) -> tuple[jax.Array, jax.Array]:
        """(a with components >= rank zeroed [*in, r_max], the scale alpha / rank)."""
        keep_R = jnp.arange(self.rank) < rank
        a = jnp.where(keep_R, self.a[...], 0.0)  # where: exact zero gradient past the rank
        return a, self.alpha / jnp.asarray(rank, jnp.float32)

    def delta_at(self, x: jax.Array, rank) -> jax.Array:
        """``Δy`` [..., *out] of ``x`` [..., *in] at rank ``rank`` (int or traced scalar)."""
        a, scale = self._masked(rank)
        keep_R = jnp.arange(self.rank) < rank
        b = jnp.where(keep_R.reshape((-1,) + (1,) * (self.b.ndim - 1)), self.b[...], 0.0)
        y = contract(contract(x, a, self.n_in), b, 1)
        return scale.astype(x.dtype) * y

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` at the step's rank (``ctx.rng``) or ``eval_rank``; ``base`` unused."""
        return self.delta_at(x, self.active_rank(ctx))

    def delta_kernel_at(self, rank) -> jax.Array:
        """``ΔK_b`` [*in, *out] at rank ``rank`` in fp32."""
        a, scale = self._masked(rank)
        return scale * outer(a, self.b[...])

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` at ``eval_rank`` (what a merged model computes with no rng)."""
        return self.delta_kernel_at(self.eval_rank)
