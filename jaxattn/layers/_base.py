"""Shared helpers of jaxattn.layers: parameters annotated with logical axis names.

Every parameter of a jaxattn layer is created through :func:`param`, so it carries its logical
axis names (``embed``, ``heads``, ...) as ``out_sharding`` metadata; ``jaxattn.sharding`` maps
those names to mesh axes. Eager sharding is off: names are logical, not mesh axes, so modules
can be built outside any mesh (on CPU, in tests) and sharded later with the rules table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["param", "dense", "default_init", "zeros_init", "ones_init", "DTypeLike"]

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


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """Contract the last ``n_in`` axes of ``x`` with the first ``n_in`` axes of ``w``.

    ``x [..., I...] · w [I..., O...] -> [..., O...]``, the same as the einsum, but computed as
    one 2-D matmul ``[prod(...), prod(I)] @ [prod(I), prod(O)]``. XLA on CPU lowers the 3-D
    einsums' gradients (``btd,df->btf``, ``btnv,nvd->btd``) to strided transposes fused with
    elementwise work that cost more than the matmuls; the 2-D form avoids them.

    Args:
      x: input [..., I...] (e.g. x_BTD, or o_BTNV with ``n_in=2``).
      w: weight [I..., O...] in x's dtype.
      n_in: how many axes are contracted.
      preferred_element_type: accumulation / result dtype, as in ``jnp.dot``.

    Returns:
      [..., O...] in the result dtype of ``x @ w``.
    """
    lead, in_shape, out_shape = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    if x.shape[x.ndim - n_in :] != in_shape:
        raise ValueError(f"x {x.shape} and w {w.shape} disagree on the {n_in} contracted axes")
    k, n = math.prod(in_shape), math.prod(out_shape)
    y = jnp.dot(
        x.reshape(math.prod(lead), k),
        w.reshape(k, n),
        preferred_element_type=preferred_element_type,
    )
    return y.reshape(*lead, *out_shape)
