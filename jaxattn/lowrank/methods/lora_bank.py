"""``lora_bank``: n LoRA adapters of one projection, one per sequence of a mixed batch.

S-LoRA (Sheng et al., 2023) / Punica (Chen et al., 2023) serve many LoRA adapters (Hu et al.,
2021) in one batch: row b of the batch uses adapter ``i = ctx.sequence_ids_B[b]``, and its
delta is computed by gathering that row's factors and running two batched low-rank matmuls::

    delta[b] = scale[i] * (x[b] @ A[i]) @ B[i]          x[b]: [..., *in], A[i]: [*in, r],
                                                        B[i]: [r, *out]

so the cost is that of one LoRA of rank r per row, never n deltas. ``i = -1`` means "no
adapter" (delta 0 for that row). Ranks may differ per adapter: every adapter is stored padded
to the largest rank r with zeros (and a rank mask), so a padded adapter gives exactly the
result of its unpadded factors.

Parameters: ``a`` [n, *in, r], ``b`` [n, r, *out] (``AdapterParam``, sharded like the kernel on
their in / out side, replicated on the adapter and rank axes); buffers (not trained):
``scale`` [n] (alpha / r_i, or alpha / sqrt(r_i) for rsLoRA, Kalajdzievski 2023) and
``rank_mask`` [n, r] (1 on each adapter's first r_i rank slots).

A mixed bank has no single weight change: ``delta_kernel`` raises unless n == 1; merge one
adapter with ``delta_kernel_of(i, base)``. So the MLA absorbed decode, which reads
``k_b`` / ``v_b`` through ``effective_kernel``, cannot take a mixed bank on those two
projections (it raises that error); banks on MLA's q, kv_a, o and the MLP decode fine.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.lowrank._factors import factor, kernel_axes
from jaxattn.lowrank._registry import MethodConfig, register_method

__all__ = ["LoRABankConfig", "LoRABank", "AdapterBuffer", "bank_scale"]


def row_ids(ctx, x: jax.Array, num_adapters: int, what: str) -> jax.Array | None:
    """Each row's adapter id, int32 [B], from ``ctx.sequence_ids_B`` (-1: no adapter).

    None when there are no ids and one adapter (every row uses adapter 0). Concrete ids are
    range-checked here; under jit they cannot be, and ``gathered_delta`` makes such rows NaN.
    """
    ids = None if ctx is None else getattr(ctx, "sequence_ids_B", None)
    if ids is None:
        if num_adapters == 1:
            return None
        raise ValueError(
            f"{what} of {num_adapters} adapters needs ctx.sequence_ids_B (int [B]: which "
            "adapter each row uses, -1 for none); pass sequence_ids_B to the model"
        )
    ids = jnp.asarray(ids)
    if ids.shape != x.shape[:1] or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"sequence_ids_B must be int [{x.shape[0]}] (one id per row of the batch), "
            f"got {ids.dtype} {ids.shape}"
        )
    if not isinstance(ids, jax.core.Tracer):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= num_adapters:
            raise ValueError(
                f"sequence_ids_B must lie in [-1, {num_adapters - 1}] (-1: no adapter) "
                f"for {what} of {num_adapters} adapters, got {lo}..{hi}"
            )
    return ids.astype(jnp.int32)


def gathered_delta(x_bmi, a_nir, b_nro, gain_nr, ids_B) -> jax.Array:
    """Per-row LoRA ``((x[b] @ A[i_b]) * gain[i_b]) @ B[i_b]`` as [B, M, o] in x's dtype.

    The S-LoRA / Punica gather: row b reads adapter ``ids_B[b]`` (None: adapter 0 for every
    row); id -1 gives exactly 0, an id outside [-1, n) (only reachable under jit) gives NaN.
    """
    dt = x_bmi.dtype
    if ids_B is None:
        h = jnp.einsum("bmi,ir->bmr", x_bmi, a_nir[0].astype(dt)) * gain_nr[0].astype(dt)
        return jnp.einsum("bmr,ro->bmo", h, b_nro[0].astype(dt))
    n = a_nir.shape[0]
    idx = jnp.clip(ids_B, 0, n - 1)
    bad = (ids_B < -1) | (ids_B >= n)
    row_gain = jnp.where((ids_B >= 0)[:, None], gain_nr[idx], 0.0)  # [B, r]
    row_gain = jnp.where(bad[:, None], jnp.nan, row_gain)
    a_g, b_g = a_nir[idx].astype(dt), b_nro[idx].astype(dt)  # gather: [B, i, r], [B, r, o]
    h = jnp.einsum("bmi,bir->bmr", x_bmi, a_g) * row_gain[:, None, :].astype(dt)
    return jnp.einsum("bmr,bro->bmo", h, b_g)


class AdapterBuffer(nnx.Variable):
    """A fixed (non-trained) array of an adapter: not an ``nnx.Param``."""


def bank_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """LoRA's output scale: ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


class LoRABank(nnx.Module):
    """n stacked LoRA adapters of one ``Linear``; row b of a batch uses adapter
    ``ctx.sequence_ids_B[b]`` (-1: none).

    Args:
      a: [n, *in, r] down factors (padded with zeros past each adapter's rank).
      b: [n, r, *out] up factors.
      scale: [n] per-adapter output scales.
      ranks: [n] each adapter's true rank (default r for all); slots past it are masked.
      in_axes, out_axes: logical axes of the kernel's in / out dims (sharding of the factors).
    """

    def __init__(self, a, b, scale, ranks=None, *, in_axes=None, out_axes=None):
        a, b = jnp.asarray(a), jnp.asarray(b)
        scale = np.asarray(scale, np.float32)
        if a.ndim < 3 or b.ndim < 3 or a.shape[0] != b.shape[0] or a.shape[-1] != b.shape[1]:
            raise ValueError(
                f"a must be [n, *in, r] and b [n, r, *out] with the same n and r, "
                f"got a {a.shape} and b {b.shape}"
            )
        n, r = a.shape[0], a.shape[-1]
        if scale.shape != (n,):
            raise ValueError(f"scale must be [{n}] (one per adapter), got shape {scale.shape}")
        ranks = np.full((n,), r) if ranks is None else np.asarray(ranks, np.int64)
        if ranks.shape != (n,) or ranks.min() < 1 or ranks.max() > r:
            raise ValueError(f"ranks must be [{n}] ints in [1, {r}], got {ranks.tolist()}")
        self.in_shape, self.out_shape = tuple(a.shape[1:-1]), tuple(b.shape[2:])
        in_axes = (None,) * len(self.in_shape) if in_axes is None else tuple(in_axes)
        out_axes = (None,) * len(self.out_shape) if out_axes is None else tuple(out_axes)
        self.num_adapters, self.max_rank = int(n), int(r)
        self.ranks = tuple(int(x) for x in ranks)
        self.a = factor(a, (None, *in_axes, None), dtype=a.dtype)
        self.b = factor(b, (None, None, *out_axes), dtype=b.dtype)
        self.scale = AdapterBuffer(jnp.asarray(scale))
        self.rank_mask = AdapterBuffer(
            jnp.asarray(np.arange(r)[None, :] < ranks[:, None], jnp.float32)
        )

    def delta(self, x: jax.Array, ctx, *, base: jax.Array | None = None) -> jax.Array:
        """``scale[i_b] * (x[b] @ A[i_b]) @ B[i_b]`` per row b, as [B, ..., *out] in x's dtype.

        Under jit an id out of [-1, n) cannot be checked: its row is NaN.
        """
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in :] != self.in_shape or x.ndim < n_in + 1:
            raise ValueError(f"lora_bank input {x.shape} must be [B, ..., *{self.in_shape}]")
        ids = row_ids(ctx, x, self.num_adapters, "a lora_bank")
        lead = x.shape[: x.ndim - n_in]
        fan_in, fan_out = math.prod(self.in_shape), math.prod(self.out_shape)
        a = self.a[...].reshape(self.num_adapters, fan_in, self.max_rank)
        b = self.b[...].reshape(self.num_adapters, self.max_rank, fan_out)
        gain = self.scale[...][:, None] * self.rank_mask[...]  # [n, r]
        y = gathered_delta(x.reshape(lead[0], -1, fan_in), a, b, gain, ids)
        return y.reshape(*lead, *self.out_shape)

    def delta_kernel_of(self, i: int, base: jax.Array | None = None) -> jax.Array:
        """Adapter ``i``'s weight change ``scale[i] * A[i] @ B[i]`` as [*in, *out] (in
        ``base``'s dtype when given), for merging that one adapter."""
        if not 0 <= int(i) < self.num_adapters:
            raise ValueError(f"adapter index i={i} must lie in [0, {self.num_adapters})")
        fan_in, fan_out = math.prod(self.in_shape), math.prod(self.out_shape)
        a = self.a[...][i].reshape(fan_in, self.max_rank)
        b = self.b[...][i].reshape(self.max_rank, fan_out)
        w = (a * (self.scale[...][i] * self.rank_mask[...][i])[None, :]) @ b
        w = w.reshape(*self.in_shape, *self.out_shape)
        return w if base is None else w.astype(base.dtype)

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """The weight change of a one-adapter bank; a mixed bank has none (raises)."""
        if self.num_adapters == 1:
            return self.delta_kernel_of(0, base)
        raise ValueError(
            f"a lora_bank of {self.num_adapters} adapters has no single delta kernel (each row "
            "of a batch uses its own adapter); merge one adapter with delta_kernel_of(i, base) "
            "or jaxattn.lowrank.unstack"
        )


@register_method("lora_bank")
@dataclasses.dataclass(frozen=True)
class LoRABankConfig(MethodConfig):
    """n LoRA adapters of each selected projection, chosen per row by ``sequence_ids_B``.

    Fields:
      num_adapters: n >= 1.
      rank: one rank for all, or a tuple of n ranks (stored padded to the largest).
      alpha: LoRA alpha; adapter i's scale is alpha / rank_i (alpha / sqrt(rank_i) if
        ``use_rslora``).
      use_rslora: rsLoRA scaling.

    Init as LoRA: A ~ N(0, 1/fan_in) on each adapter's live rank slots, B = 0 (delta 0).
    """

    num_adapters: int = 2
    rank: int | tuple[int, ...] = 8
    alpha: float = 8.0
    use_rslora: bool = False

    def ranks(self) -> tuple[int, ...]:
        r = self.rank
        return (
            tuple(int(x) for x in r)
            if isinstance(r, tuple | list)
            else (int(r),) * int(self.num_adapters)
        )

    def validate(self, path: str, linear) -> None:
        if int(self.num_adapters) < 1:
            raise ValueError(f"lora_bank at {path}: num_adapters={self.num_adapters} must be >= 1")
        ranks = self.ranks()
        if len(ranks) != self.num_adapters:
            raise ValueError(
                f"lora_bank at {path}: rank {self.rank} must be one int or {self.num_adapters} "
                "ints (one per adapter)"
            )
        top = min(linear.fan_in, linear.fan_out)
        if min(ranks) < 1 or max(ranks) > top:
            raise ValueError(f"lora_bank at {path}: rank {self.rank} must lie in [1, {top}]")

    def build(self, path: str, linear, *, rngs: nnx.Rngs) -> LoRABank:
        ranks = self.ranks()
        n, r = len(ranks), max(ranks)
        mask = np.arange(r)[None, :] < np.asarray(ranks)[:, None]  # [n, r]
        shape_a = (n, *linear.in_shape, r)
        a = jax.random.normal(rngs.params(), shape_a, jnp.float32) / math.sqrt(linear.fan_in)
        a = a * jnp.asarray(mask, jnp.float32).reshape(n, *(1,) * len(linear.in_shape), r)
        b = jnp.zeros((n, r, *linear.out_shape), jnp.float32)
        scale = [bank_scale(self.alpha, k, self.use_rslora) for k in ranks]
        in_axes, out_axes = kernel_axes(linear)
        return LoRABank(a, b, scale, ranks, in_axes=in_axes, out_axes=out_axes)
