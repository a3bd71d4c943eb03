"""Pieces shared by the TPU and GPU flash attention kernels: in-kernel masking from mask specs
and visit-table flags, visit-table addressing, output structs that work under shard_map.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import block_tables as bt


class _LeafBit:
    """Stands in for an array-data mask leaf inside a kernel: its block value, broadcast."""

    def __init__(self, bit_i32):
        self.bit_i32 = bit_i32  # 0 or 1, an int32 scalar (broadcast as int, then compared)

    def __call__(self, q_pos, k_pos):
        shape = jnp.broadcast_shapes(q_pos.shape, k_pos.shape)
        return jnp.broadcast_to(self.bit_i32, shape) == 1


def traceable(mask, flags, counter=None):
    """``mask`` with each array-data leaf replaced by its block bit from ``flags``."""
    counter = [0] if counter is None else counter
    if mask is None or not mask.has_array_data:
        return mask
    kids = bt.children(mask)
    if kids is None:
        bit = 1 + counter[0]
        counter[0] += 1
        return _LeafBit((flags >> bit) & 1)
    fields = [f.name for f in dataclasses.fields(mask)]
    new = {
        n: traceable(getattr(mask, n), flags, counter)
        for n in fields
        if hasattr(getattr(mask, n), "block_visible")
    }
    return dataclasses.replace(mask, **new)


def visible(mask, has_segments, flags, q_pos, k_pos, kv_len, q_seg, k_seg, masked):
    """Elementwise visibility of a block; None when everything is visible.

    ``masked`` False means the block map flagged the block full (only segments can hide
    pairs there); q_pos / k_pos are absolute positions broadcast to the block's shape.
    """
    vis = None
    if masked:
        vis = k_pos < kv_len
        spec = traceable(mask, flags)
        if spec is not None:
            vis = vis & spec(q_pos, k_pos)
    if has_segments:
        same = q_seg == k_seg
        vis = same if vis is None else vis & same
    return vis


def is_full(flags):
    """Whether a visited block's flags mark every pair visible (no elementwise mask needed)."""
    return (flags & bt.FULL_BIT) == bt.FULL_BIT


def capped_logits(s, scale, soft_cap):
    """scale * s, soft-capped as cap * tanh(. / cap); also tanh (for the backward) or None."""
    s = s * scale
    if soft_cap is None:
        return s, None
    t = jnp.tanh(s / soft_cap)
    return soft_cap * t, t


def score_grad(p, dp, delta, t):
    """dS w.r.t. the raw (pre-cap) scaled logits: P * (dP - delta), times 1 - tanh^2 if capped."""
    ds = p * (dp - delta)
    return ds if t is None else ds * (1.0 - t * t)


def scalar_operands(q_offset, kv_len_B, tables):
    """The scalar operands of every flash kernel: q_offset [1], kv_len [B], and the visit
    tables flattened for SMEM: index, count, flags."""
    return (
        jnp.asarray(q_offset, jnp.int32).reshape(1),
        kv_len_B,
        tables.index.reshape(-1),
        tables.count.reshape(-1),
        tables.flags.reshape(-1),
    )


def map_pos(Rb, Rk, rows, steps):
    """Flat offset of visit-table entry (batch row b, kv head h, row, step)."""

    def pos(b, h, row, step):
        rb = b if Rb > 1 else 0
        rk = h if Rk > 1 else 0
        return ((rb * Rk + rk) * rows + row) * steps + step

    return pos


def count_pos(Rb, Rk, rows, steps):
    """Flat offset of the count of (batch row b, kv head h, row)."""
    del steps

    def pos(b, h, row):
        rb = b if Rb > 1 else 0
        rk = h if Rk > 1 else 0
        return (rb * Rk + rk) * rows + row

    return pos


def map_shape(tables):
    """Static (Rb, Rk, rows, steps) of visit tables."""
    return tables.shape


def out_struct(shape, dtype, like):
    """ShapeDtypeStruct varying over the same shard_map axes as ``like`` (for check_vma).

    The field is ``manual_axis_type`` in jax 0.10 (``vma`` before); without either, plain.
    """
    aval = jax.typeof(like)
    for field in ("manual_axis_type", "vma"):
        value = getattr(aval, field, None)
        if value is not None:
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{field: value})
            except TypeError:
                continue
    return jax.ShapeDtypeStruct(shape, dtype)
