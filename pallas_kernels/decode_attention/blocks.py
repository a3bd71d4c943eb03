"""Which cache blocks a decode step reads: the live range shared by the TPU and GPU kernels.

Query t of sequence b sits at position kv_len - T + t; with a window W it sees keys down to
kv_len - T - W + 1. Blocks outside [first, last] hold no key any query can see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["live_block_range", "live_blocks"]


def live_block_range(kv_len, *, T: int, block_kv: int, window: int | None, cache_len: int):
    """First and last cache block that any of the T queries can see (clamped to >= 0).

    Keys past ``cache_len`` do not exist: a kv_len > C (bad input) must not make the index
    map point past the cache, where a DMA would read out of bounds.
    """
    lo_key = 0 if window is None else jnp.maximum(kv_len - T - window + 1, 0)
    # lax.div/rem (truncating) rather than // and %: operands are >= 0, and floor semantics
    # would add sign fix-ups to the scalar code.
    lo_blk = jax.lax.div(lo_key, block_kv)
    n_keys = jnp.minimum(kv_len, cache_len)
    hi_blk = jnp.maximum(jax.lax.div(n_keys + block_kv - 1, block_kv) - 1, 0)
    return lo_blk, hi_blk


def live_blocks(kv_len, *, T: int, block_kv: int, window: int | None, cache_len: int):
    """First live block and the number of live blocks (0 when the sequence has no key)."""
    lo_blk, hi_blk = live_block_range(
        kv_len, T=T, block_kv=block_kv, window=window, cache_len=cache_len
    )
    has_keys = jnp.minimum(kv_len, cache_len) > 0
    return lo_blk, jnp.where(has_keys, jnp.maximum(hi_blk - lo_blk + 1, 0), 0)
