"""NOLA: LoRA factors as trained mixtures of fixed random low-rank bases.

Koohpayegani, Navaneet, Nooralinejad, Kolouri, Pirsiavash, "NOLA: Compressing LoRA using
Linear Combination of Random Basis" (ICLR 2024, arXiv:2310.02556). LoRA's factors are
re-parameterized as linear combinations of k (resp. l) fixed random matrices and only the
mixture coefficients are trained:

    ΔW = (alpha / r) · (Σⱼ βⱼ Bⱼ)(Σᵢ αᵢ Aᵢ),

In the [*in, *out] kernel layout of ``Linear`` (ΔK = ΔWᵀ) with bases A_bases [k, *in, r] and
B_bases [l, r, *out]:

    a = Σᵢ αᵢ A_bases[i]   [*in, r]        b = Σⱼ βⱼ B_bases[j]   [r, *out]
    Δy = (alpha / r) · (x·a)·b             ΔK = (alpha / r) · a·b

The bases are not parameters and are never stored: they are regenerated on every call from
``jax.random.key(seed)`` folded with a hash of the module path (a static int on the adapter),
so a checkpoint holds only α [k], β [l] and the seed. β starts at 0 (an exact no-op); α at
U(-1/√k, 1/√k). Trainable count: k + l, independent of r and of the layer's shape.
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
from jaxattn.lowrank.methods._seeds_common import check_rank, contract, fold_key, outer

__all__ = ["NOLAConfig", "NOLAAdapter"]


@register_method("nola")
@dataclasses.dataclass(frozen=True)
class NOLAConfig(MethodConfig):
    """NOLA's hyper-parameters.

    Attributes:
      rank: rank r of the random bases, 1 <= r <= min(d_in, d_out).
      num_basis_a: k, the number of random bases of the down factor (>= 1).
      num_basis_b: l, the number of random bases of the up factor (>= 1).
      alpha: scale numerator (scale alpha / rank).
      seed: the base seed of the random bases (each path folds in its own hash).
    """

    rank: int = 8
    num_basis_a: int = 1024
    num_basis_b: int = 1024
    alpha: float = 8.0
    seed: int = 0

    def validate(self, path: str, linear: Linear) -> None:
        check_rank(path, linear, self.rank, min(linear.fan_in, linear.fan_out))
        for name in ("num_basis_a", "num_basis_b"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} for {path!r} must be an int >= 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r} for {path!r} must be an int")

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> NOLAAdapter:
        self.validate(path, linear)
        return NOLAAdapter(
            linear, path, self.rank, self.num_basis_a, self.num_basis_b,
            self.alpha / self.rank, self.seed, rngs=rngs,
        )  # fmt: skip


class NOLAAdapter(nnx.Module):
    """The NOLA adapter of one ``Linear``: coefficients ``coef_a`` [k], ``coef_b`` [l] (fp32
    ``AdapterParam``, replicated); the bases come from :meth:`bases` (see module docstring)."""

    def __init__(self, linear: Linear, path, rank, k, l, scale, seed, *, rngs: nnx.Rngs):
        self.in_shape, self.out_shape = linear.in_shape, linear.out_shape
        self.n_in = len(self.in_shape)
        self.rank, self.scale = int(rank), float(scale)
        self.seed, self.path = int(seed), str(path)  # static: the bases' key
        bound = 1.0 / math.sqrt(k)
        self.coef_a = factor(jax.random.uniform(rngs.params(), (k,), minval=-bound, maxval=bound),
                             (None,))  # fmt: skip
        self.coef_b = factor(jnp.zeros((l,)), (None,))

    def bases(self) -> tuple[jax.Array, jax.Array]:
        """The fixed bases (A [k, *in, r], B [l, r, *out], fp32), regenerated from the seed.

        A ~ U(-1/√d_in, 1/√d_in) (LoRA's A init), B ~ U(-1/√r, 1/√r)."""
        ka, kb = jax.random.split(fold_key(self.seed, self.path))
        k, l = self.coef_a.shape[0], self.coef_b.shape[0]
        ba = 1.0 / math.sqrt(math.prod(self.in_shape))
        bb = 1.0 / math.sqrt(self.rank)
        a = jax.random.uniform(ka, (k, *self.in_shape, self.rank), minval=-ba, maxval=ba)
        b = jax.random.uniform(kb, (l, self.rank, *self.out_shape), minval=-bb, maxval=bb)
        return a, b

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """The mixed factors a [*in, r], b [r, *out] (fp32)."""
        a_bases, b_bases = jax.lax.stop_gradient(self.bases())
        a = jnp.tensordot(self.coef_a[...], a_bases, 1)
        b = jnp.tensordot(self.coef_b[...], b_bases, 1)
        return a, b

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` [..., *out] of ``x`` [..., *in] in x's dtype (``base`` unused)."""
        a, b = self.factors()
        y = contract(contract(x, a, self.n_in), b, 1)
        return jnp.asarray(self.scale, x.dtype) * y

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` [*in, *out] = (alpha / r)·a·b in fp32."""
        a, b = self.factors()
        return self.scale * outer(a, b)
