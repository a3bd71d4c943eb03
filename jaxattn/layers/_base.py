"""Shared helpers of jaxattn.layers: parameters annotated with logical axis names.

Every parameter of a jaxattn layer is created through :func:`param`, so it carries its logical
axis names (``embed``, ``heads``, ...) as ``out_sharding`` metadata; ``jaxattn.sharding`` maps
those names to mesh axes. Eager sharding is off: names are logical, not mesh axes, so modules
can be built outside any mesh (on CPU, in tests) and sharded later with the rules table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["param", "default_init", "zeros_init", "ones_init", "DTypeLike"]

DTypeLike = Any

default_init = nnx.initializers.normal(stddev=0.02)
zeros_init = nnx.initializers.zeros_init()
ones_init = nnx.initializers.ones_init()


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str | None],
    *,
    init=default_init,
    dtype: DTypeLike = jnp.float32,
) -> nnx.Param:
    """A parameter of ``shape`` initialised by ``init`` and annotated with logical ``axes``.

    Args:
      rngs: source of the ``params`` key.
      shape: the parameter's shape.
      axes: one logical axis name (or None) per dimension of ``shape``.
      init: a jax initializer ``init(key, shape, dtype)``.
      dtype: the parameter dtype.

    Returns:
      nnx.Param with ``out_sharding=axes`` metadata.
    """
    shape = tuple(int(s) for s in shape)
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"{axes=} must name every dimension of {shape=}")
    wrapped = nnx.with_partitioning(init, axes, eager_sharding=False)
    return nnx.Param(wrapped(rngs.params(), shape, dtype))


def cast(x: jax.Array, dtype: DTypeLike | None) -> jax.Array:
    """``x`` in ``dtype`` (unchanged when dtype is None)."""
    return x if dtype is None else x.astype(dtype)
