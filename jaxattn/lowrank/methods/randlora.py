"""RandLoRA: a full-rank update from fixed random low-rank bases and trained diagonals.

Albert, Zhang, Ramasinghe, Lucey, "RandLoRA: Full-rank parameter-efficient fine-tuning of
large models" (ICLR 2025, arXiv:2502.00987), as defined by PEFT's ``tuners/randlora`` (0.21.2,
read for its definition; not copied). With d_min = min(d_in, d_out), d_max = max(d_in, d_out),
per-basis rank r and n = ceil(d_min / r) bases:

    M = (alpha / r) · Σᵢ Bᵢ Λᵢ A Γᵢ        [d_max, d_min]

  A  [r, d_min]      one fixed random matrix shared by every basis (PEFT's ``randlora_A``)
  Bᵢ [d_max, r]      fixed random, one per basis (PEFT's ``randlora_B`` [d_max, n, r],
                     whose flattened [d_max, n·r] columns pair with PEFT's (r, n)-ordered
                     scaled A rows: Bᵢ[:, j] = B.reshape(d_max, r, n)[:, j, i])
  Λᵢ = diag(λ[:, i]) λ [r, n]          trained, zero at init (an exact no-op)
  Γᵢ = diag(γ[i])    γ [n, d_min]      trained, 1 / d_max at init

The diagonal Γ sits on the smaller side, so ΔW = M when d_in = d_min (W [d_out, d_in]) and
ΔW = Mᵀ otherwise; in the [*in, *out] kernel layout ΔK = ΔWᵀ. n·r ≥ d_min lets ΔW reach full
rank once γ differs across bases (with γ at its constant init the shared A caps the rank at
r: ΔW = (Σᵢ Bᵢ Λᵢ) A γ₀). Both random matrices are U(-1, 1) normalized by their empirical
std (PEFT: kaiming uniform then /std), regenerated on every call from ``seed`` folded with
the path's hash: they are not parameters and not checkpointed. Trainable count:
r·n + n·d_min. A multi-dim in/out shape is flattened to d_in / d_out;
λ and γ are replicated (logical axes None).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import Linear
from jaxattn.lowrank._factors import factor
from jaxattn.lowrank._registry import MethodConfig, register_method
from jaxattn.lowrank.methods._seeds_common import check_rank, fold_key

__all__ = ["RandLoRAConfig", "RandLoRAAdapter"]


@register_method("randlora")
@dataclasses.dataclass(frozen=True)
class RandLoRAConfig(MethodConfig):
    """RandLoRA's hyper-parameters.

    Attributes:
      rank: per-basis rank r, 1 <= r <= min(d_in, d_out); n = ceil(d_min / r) bases.
      alpha: scale numerator (scale alpha / rank; PEFT's default is 20·r).
      seed: the base seed of the random bases (each path folds in its own hash).
    """

    rank: int = 32
    alpha: float = 640.0
    seed: int = 0

    def validate(self, path: str, linear: Linear) -> None:
        check_rank(path, linear, self.rank, min(linear.fan_in, linear.fan_out))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r} for {path!r} must be an int")

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> RandLoRAAdapter:
        self.validate(path, linear)
        return RandLoRAAdapter(linear, path, self.rank, self.alpha / self.rank, self.seed)


class RandLoRAAdapter(nnx.Module):
    """The RandLoRA adapter of one ``Linear``: ``lam`` [r, n] and ``gamma`` [n, d_min] (fp32
    ``AdapterParam``); the bases come from :meth:`bases` (see the module docstring)."""

    def __init__(self, linear: Linear, path: str, rank: int, scale: float, seed: int):
        self.in_shape, self.out_shape = linear.in_shape, linear.out_shape
        d_in, d_out = linear.fan_in, linear.fan_out
        self.d_min, self.d_max = min(d_in, d_out), max(d_in, d_out)
        self.in_is_min = d_in == self.d_min  # PEFT: ``min_dim == in_features``
        self.rank, self.scale = int(rank), float(scale)
        self.num_bases = math.ceil(self.d_min / self.rank)
        self.seed, self.path = int(seed), str(path)  # static: the bases' key
        self.lam = factor(jnp.zeros((self.rank, self.num_bases)), (None, None))
        self.gamma = factor(jnp.full((self.num_bases, self.d_min), 1.0 / self.d_max), (None, None))

    def bases(self) -> tuple[jax.Array, jax.Array]:
        """The fixed bases in PEFT's layout: A [r, d_min], B [d_max, n, r] (fp32)."""
        ka, kb = jax.random.split(fold_key(self.seed, self.path))
        a = jax.random.uniform(ka, (self.rank, self.d_min), minval=-1.0, maxval=1.0)
        b = jax.random.uniform(kb, (self.d_max, self.num_bases, self.rank), minval=-1.0, maxval=1.0)
        return a / jnp.std(a), b / jnp.std(b)

    def _factors(self) -> tuple[jax.Array, jax.Array]:
        """scaled [r, n, d_min] = λ[j, i]·A[j]·γ[i] and Bm [d_max, r, n] (Bᵢ = Bm[:, :, i])."""
        a, b = jax.lax.stop_gradient(self.bases())
        scaled = self.lam[...][:, :, None] * a[:, None, :] * self.gamma[...][None]
        return scaled, b.reshape(self.d_max, self.rank, self.num_bases)

    def matrix(self) -> jax.Array:
        """M = (alpha / r)·Σᵢ Bᵢ Λᵢ A Γᵢ [d_max, d_min] in fp32."""
        scaled, bm = self._factors()
        return self.scale * jnp.einsum("ojn,jnm->om", bm, scaled)

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` [..., *out] of ``x`` [..., *in] in x's dtype (``base`` unused)."""
        scaled, bm = self._factors()
        scaled, bm = scaled.astype(x.dtype), bm.astype(x.dtype)
        lead = x.shape[: x.ndim - len(self.in_shape)]
        x2 = x.reshape(*lead, -1)
        if self.in_is_min:
            z = jnp.einsum("...m,jnm->...jn", x2, scaled)
            y = jnp.einsum("...jn,ojn->...o", z, bm)
        else:
            z = jnp.einsum("...o,ojn->...jn", x2, bm)
            y = jnp.einsum("...jn,jnm->...m", z, scaled)
        return (jnp.asarray(self.scale, x.dtype) * y).reshape(*lead, *self.out_shape)

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` [*in, *out] (= ΔWᵀ) in fp32."""
        m = self.matrix()
        dk = m.T if self.in_is_min else m  # [d_in, d_out]
        return dk.reshape(*self.in_shape, *self.out_shape)
