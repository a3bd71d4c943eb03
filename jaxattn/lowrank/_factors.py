"""Adapter factors as parameters with logical axes, placed like the weight they adapt.

A factor of a ``Linear`` [*in, *out] is sharded like that weight on its in- or out-side and
replicated on its rank axis (logical name None), so a 2x2x2 mesh shards an adapter exactly as
the base kernel and the rank contraction needs no communication beyond the base's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxattn.layers import AdapterParam, Linear

__all__ = ["kernel_axes", "factor", "RANK_AXIS"]

RANK_AXIS = None  # the rank axis of every factor is replicated


def kernel_axes(linear: Linear) -> tuple[tuple, tuple]:
    """The logical axes of ``linear``'s kernel as (in axes, out axes), in [*in, *out] order
    (a tied, transposed head stores [*out, *in]; its axes are reordered here). A factorised
    projection (``Linear.form``, no dense kernel) has none here: its factors are replicated."""
    kernel = linear.kernel
    axes = () if kernel is None else tuple(kernel.get_metadata().get("out_sharding") or ())
    n_in, n_out = len(linear.in_shape), len(linear.out_shape)
    if len(axes) != n_in + n_out:
        axes = (None,) * (n_in + n_out)
    if linear.transposed:
        return axes[n_out:], axes[:n_out]
    return axes[:n_in], axes[n_in:]


def factor(value: jax.Array, axes: Sequence[str | None], *, dtype=jnp.float32) -> AdapterParam:
    """An ``AdapterParam`` holding ``value`` (cast to ``dtype``) with logical ``axes``.

    Raises:
      ValueError: ``axes`` does not name every dimension of ``value``.
    """
    value = jnp.asarray(value, dtype)
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"factor axes {axes} must name every dim of shape {value.shape}")
    return AdapterParam(value, out_sharding=axes, eager_sharding=False)
