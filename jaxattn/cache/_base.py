"""Shared pieces of the fixed-capacity caches: ragged per-sequence writes and lengths.

Every cache is a pytree of fixed-shape arrays (so it can live in a ``jax.lax.while_loop`` carry)
plus ``lengths_B``, the number of valid positions per sequence. Token ``t`` of sequence ``b`` is
stored at slot ``t``: sequences are left-aligned, and a write of ``T`` new tokens lands at slots
``lengths_B[b] ... lengths_B[b] + T - 1``. Writes do not move ``lengths_B``; ``advance`` does, so
a padded prefill can write ``T`` slots and then count only each sequence's real tokens (later
writes overwrite the padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["write_rows", "check_capacity"]


def write_rows(buf_BC_: jax.Array, new_BT_: jax.Array, start_B: jax.Array) -> jax.Array:
    """Write ``new_BT_`` into ``buf_BC_`` at slot ``start_B[b]`` of each sequence.

    Args:
      buf_BC_: cache buffer [B, C, ...].
      new_BT_: new rows [B, T, ...] (cast to the buffer's dtype).
      start_B: int [B] first slot of each sequence's write.

    Returns:
      The updated buffer [B, C, ...]. A write past capacity is clamped by
      ``dynamic_update_slice`` (callers size the cache; see ``check_capacity``).
    """
    new_BT_ = new_BT_.astype(buf_BC_.dtype)

    def one(buf_C_, new_T_, start):
        return jax.lax.dynamic_update_slice_in_dim(buf_C_, new_T_, start, axis=0)

    return jax.vmap(one)(buf_BC_, new_BT_, start_B.astype(jnp.int32))


def check_capacity(capacity: int, needed: int) -> None:
    """Raise ValueError when ``needed`` static positions do not fit in ``capacity``."""
    if needed > capacity:
        raise ValueError(f"cache capacity {capacity} is too small for {needed} positions")
