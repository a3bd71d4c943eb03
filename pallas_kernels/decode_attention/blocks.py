"""Which cache blocks a decode step reads: the live range shared by the TPU and GPU kernels.

Query t of sequence b sits at position p = q_start + t (by default q_start = kv_len - T: the
queries are the last T cached tokens); it sees keys j <= p with j < kv_len, and with a window
W keys down to p - W + 1. Blocks outside [first, last] hold no key any query can see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["live_block_range", "live_blocks", "visible_keys"]


def visible_keys(kv_len, q_start, *, T: int, cache_len: int):
    """Keys that exist and that the last query can see: j < min(kv_len, C, q_start + T)."""
    return jnp.maximum(jnp.minimum(jnp.minimum(kv_len, cache_len), q_start + T), 0)


def live_block_range(
    kv_len, *, T: int, block_kv: int, window: int | None, cache_len: int, q_start=None
):
    """First and last cache block that any of the T queries can see (clamped to >= 0).

    Keys past ``cache_len`` do not exist: a kv_len > C (bad input) must not make the index
    map point past the cache, where a DMA would read out of bounds. ``q_start`` (default
    kv_len - T) is the position of query 0.
    """
    q_start = kv_len - T if q_start is None else q_start
    lo_key = 0 if window is None else jnp.maximum(q_start - window + 1, 0)
    # lax.div/rem (truncating) rather than // and %: operands are >= 0, and floor semantics
    # would add sign fix-ups to the scalar code.
    lo_blk = jax.lax.div(lo_key, block_kv)
    n_keys = visible_keys(kv_len, q_start, T=T, cache_len=cache_len)
    hi_blk = jnp.maximum(jax.lax.div(n_keys + block_kv - 1, block_kv) - 1, 0)
    return lo_blk, hi_blk


def live_blocks(kv_len, *, T: int, block_kv: int, window: int | None, cache_len: int, q_start=None):
    """First live block and the number of live blocks (0 when the sequence has no key)."""
    q_start = kv_len - T if q_start is None else q_start
    lo_blk, hi_blk = live_block_range(
        kv_len, T=T, block_kv=block_kv, window=window, cache_len=cache_len, q_start=q_start
    )
    has_keys = visible_keys(kv_len, q_start, T=T, cache_len=cache_len) > 0
    return lo_blk, jnp.where(has_keys, jnp.maximum(hi_blk - lo_blk + 1, 0), 0)
