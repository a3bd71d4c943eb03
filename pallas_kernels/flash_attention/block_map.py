"""Block maps: which kv blocks each query block visits (and the transpose for dk/dv).

Built outside the kernels from the mask spec's conservative block views
(``block_visible`` / ``block_full``), kv lengths and sequence padding, then compressed into
per-row lists of visible block indices that the kernels receive by scalar prefetch. The
grid's last axis walks such a list; steps past a row's count repeat its last index (no new
DMA) and skip the compute, so causal masks do about half the work and windows O(T * window).

Flags per visited block: bit 0 set means every pair in the block is visible (no
elementwise mask needed); bit 1 + l holds the block value of the l-th array-data leaf of
the mask (a BlockSparse whose cells contain whole kernel blocks), which the kernels cannot
read elementwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FULL_BIT = 1


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """Compressed visit lists, flattened for SMEM.

    Attributes:
      index: int32 [R * rows * steps]: block indices to visit, per (batch row r, row).
      count: int32 [R * rows]: how many entries of each list are real.
      flags: int32 [R * rows * steps]: FULL_BIT and array-leaf bits per visited block.
      rows, steps: list count per batch row and (static) list length (grid extent).
      per_batch: True when R = batch (kv_lengths given), else R = 1.
    """

    index: jax.Array
    count: jax.Array
    flags: jax.Array
    rows: int
    steps: int
    per_batch: bool


def array_leaves(mask) -> list:
    """The array-data leaves of a (possibly combined) mask spec, in a fixed order."""
    if mask is None or not mask.has_array_data:
        return []
    kids = children(mask)
    if kids is None:
        return [mask]
    return [leaf for kid in kids for leaf in array_leaves(kid)]


def children(mask):
    """Spec-valued dataclass fields of a combinator (And/Or), or None for a leaf."""
    if not dataclasses.is_dataclass(mask):
        return None
    kids = [getattr(mask, f.name) for f in dataclasses.fields(mask)]
    kids = [k for k in kids if hasattr(k, "block_visible")]
    return kids or None


def block_ranges(length: int, block: int, num_blocks: int, offset=0):
    """Inclusive position ranges [lo, hi] of each block, clipped to the real length."""
    starts = np.arange(num_blocks, dtype=np.int32) * block
    ends = np.minimum(starts + block, length) - 1
    return starts + offset, ends + offset


def dense_maps(mask, *, q_len, kv_len, block_q, block_kv, num_q, num_kv, q_offset):
    """Mask-only visibility, fullness and leaf bits, each [num_q, num_kv].

    Concrete numpy when ``q_offset`` is a Python int (evaluated at trace time), else traced.
    """
    static = isinstance(q_offset, (int, np.integer))
    xp = np if static else jnp
    q_lo, q_hi = block_ranges(q_len, block_q, num_q)
    k_lo, k_hi = block_ranges(kv_len, block_kv, num_kv)
    q_lo = (q_lo + q_offset)[:, None]
    q_hi = (q_hi + q_offset)[:, None]
    k_lo, k_hi = k_lo[None, :], k_hi[None, :]
    shape = (num_q, num_kv)
    # Blocks made only of padding rows are never visited (their outputs are sliced off).
    has_rows = np.arange(num_q)[:, None] * block_q < q_len
    leaves = array_leaves(mask)
    bits = xp.zeros(shape, np.int32)
    with jax.ensure_compile_time_eval():
        if mask is None:
            visible, full = xp.broadcast_to(has_rows, shape), xp.ones(shape, bool)
        else:
            visible = xp.broadcast_to(xp.asarray(mask.block_visible(q_lo, q_hi, k_lo, k_hi)), shape)
            full = xp.broadcast_to(xp.asarray(mask.block_full(q_lo, q_hi, k_lo, k_hi)), shape)
        visible = visible & has_rows
        for l, leaf in enumerate(leaves):
            leaf_vis = xp.asarray(leaf.block_visible(q_lo, q_hi, k_lo, k_hi))
            bits = bits | (xp.broadcast_to(leaf_vis, shape).astype(np.int32) << (1 + l))
    return visible, full, bits


def leaves_aligned(mask, *, q_len, kv_len, block_q, block_kv, q_offset) -> bool:
    """True when every array-data leaf is constant over each (real part of a) kernel block."""
    num_q, num_kv = -(-q_len // block_q), -(-kv_len // block_kv)
    q_lo, q_hi = block_ranges(q_len, block_q, num_q, q_offset)
    k_lo, k_hi = block_ranges(kv_len, block_kv, num_kv)
    block = (q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])
    with jax.ensure_compile_time_eval():
        for leaf in array_leaves(mask):
            if not np.array_equal(
                np.asarray(leaf.block_visible(*block)), np.asarray(leaf.block_full(*block))
            ):
                return False
    return True


def build(
    mask,
    *,
    q_len,
    kv_len,
    padded_q_len,
    padded_kv_len,
    block_q,
    block_kv,
    q_offset,
    kv_lengths,
    transpose=False,
) -> BlockMap:
    """Visit lists over kv blocks per q block (or, ``transpose``, q blocks per kv block).

    Args:
      mask: None or a mask spec.
      q_len, kv_len: real lengths T and S (the padded tails are masked).
      padded_q_len, padded_kv_len: T and S rounded up to the kernels' block multiples.
      block_q, block_kv: kernel block sizes.
      q_offset: Python int (lists sized to the longest row) or traced int32 scalar (lists
        sized to the full extent).
      kv_lengths: None or int32 [B].
      transpose: build lists of q blocks per kv block (for the dk/dv kernel).

    Returns:
      A BlockMap.
    """
    num_q, num_kv = padded_q_len // block_q, padded_kv_len // block_kv
    visible, full, bits = dense_maps(
        mask,
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_kv=block_kv,
        num_q=num_q,
        num_kv=num_kv,
        q_offset=q_offset,
    )
    k_end = np.minimum((np.arange(num_kv) + 1) * block_kv, padded_kv_len)
    if transpose:
        steps = (
            int(np.max(np.sum(visible, 0), initial=1)) if isinstance(visible, np.ndarray) else num_q
        )
    else:
        steps = (
            int(np.max(np.sum(visible, 1), initial=1))
            if isinstance(visible, np.ndarray)
            else num_kv
        )
    steps = max(steps, 1)
    lens = jnp.minimum(
        jnp.asarray(kv_len if kv_lengths is None else kv_lengths, jnp.int32), kv_len
    ).reshape(-1)
    # A kv block is visited only if it holds a key below the length, and is full only if
    # all its keys (padding included) are below it.
    k_start = jnp.arange(num_kv, dtype=jnp.int32) * block_kv
    vis_RQK = jnp.asarray(visible)[None] & (k_start[None, None, :] < lens[:, None, None])
    full_RQK = jnp.asarray(full)[None] & (jnp.asarray(k_end)[None, None, :] <= lens[:, None, None])
    flags_RQK = jnp.asarray(bits)[None] | jnp.where(full_RQK, FULL_BIT, 0)
    flags_RQK = jnp.broadcast_to(flags_RQK, vis_RQK.shape)
    if transpose:
        vis_RQK, flags_RQK = vis_RQK.swapaxes(1, 2), flags_RQK.swapaxes(1, 2)
    rows, cols = vis_RQK.shape[1:]
    # Visible columns first, in increasing order (a stable sort on "not visible").
    order = jnp.argsort(~vis_RQK, axis=-1, stable=True).astype(jnp.int32)[..., :steps]
    count = jnp.sum(vis_RQK, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    slot = jnp.arange(steps, dtype=jnp.int32)
    index = jnp.where(slot < count[..., None], order, last)
    flags = jnp.take_along_axis(flags_RQK, index, axis=-1)
    del cols
    return BlockMap(
        index=index.reshape(-1),
        count=count.reshape(-1),
        flags=flags.reshape(-1),
        rows=rows,
        steps=steps,
        per_batch=kv_lengths is not None,
    )
