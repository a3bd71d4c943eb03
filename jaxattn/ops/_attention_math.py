"""What the "xla", "chunked" and "decode" implementations share: the elementwise mask, the
scaled logits, the dropout keep-mask, head regrouping, and the split of a call into its static
part and its arrays.

All implementations build their masks with :func:`visible` and their dropout with
:func:`dropout_keep`, so they agree on what is masked and dropped by construction.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from jaxattn.ops._attention_args import AttentionArgs

__all__ = [
    "ARRAY_FIELDS",
    "dropout_keep",
    "gather_columns",
    "precision",
    "regroup",
    "scores_fp32",
    "split_arrays",
    "visible",
]

# Fields of AttentionArgs that may hold arrays: passed to custom VJPs as operands, not statics.
ARRAY_FIELDS = (
    "dense",
    "q_segment_ids",
    "kv_segment_ids",
    "q_offset",
    "kv_lengths",
    "scale",
    "visits",
    "dropout_seeds",
)


def split_arrays(a: AttentionArgs):
    """(static args with the array fields emptied, {field: value} of those fields)."""
    arrays = {}
    for field in ARRAY_FIELDS:
        x = getattr(a, field)
        if field == "visits" and x:
            arrays[field] = x
        elif field != "visits" and x is not None and not isinstance(x, (int, float)):
            arrays[field] = x
    empty = {f: (() if f == "visits" else None) for f in arrays}
    return dataclasses.replace(a, **empty), arrays


def precision(dtype):
    """HIGHEST for fp32 operands (XLA:CPU would otherwise round them), default otherwise."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def q_positions(a: AttentionArgs, q_idx):
    """Positions on the kv axis of query rows ``q_idx`` [t]: shape [1 or B, t]."""
    q_idx = q_idx[None, :]
    if a.q_offset is None:
        return q_idx
    off = jnp.asarray(a.q_offset, jnp.int32)
    return q_idx + (off[:, None] if off.ndim == 1 else off)


def gather_columns(x_bntS, cols, K: int):
    """Columns ``cols`` of a per-head array, per (batch row, kv head).

    Args:
      x_bntS: [b, n, t, S] with n = 1 or N (heads grouped n = k·G + g).
      cols: int [Rb, Rk, s] column indices (in range) per batch row and kv head.
      K: kv heads.

    Returns:
      [max(b, Rb), K or 1, G or 1, t, s].
    """
    b, n, t, _ = x_bntS.shape
    k, g = (K, n // K) if n > 1 else (1, 1)
    x = x_bntS.reshape(b, k, g, t, -1)
    Rb, Rk, s = cols.shape
    bb, kk = max(b, Rb), max(k, Rk)
    x = jnp.broadcast_to(x, (bb, kk, g, t, x.shape[-1]))
    idx = jnp.broadcast_to(cols[:, :, None, None, :], (bb, kk, g, t, s))
    return jnp.take_along_axis(x, idx, axis=-1)


def visible(a: AttentionArgs, q_idx, k_idx, dense_block=None, extra=None):
    """Which (query, key) pairs may attend, for query rows ``q_idx`` [t] and keys ``k_idx``.

    Args:
      a: the call.
      q_idx: int [t] query rows; rows past T (block padding) are masked.
      k_idx: int [s] keys, or [Rb, Rk, s] per batch row (Rb = 1 or B) and kv head (Rk = 1 or
        K); keys past S are masked.
      dense_block: the dense mask at these rows and keys when the caller sliced it: [b, n, t, s]
        (n = 1 or N), or grouped [b, k, g, t, s]; None takes ``a.dense`` whole.
      extra: a further bool factor broadcastable to the result (e.g. block-visit lists).

    Returns:
      bool [B or 1, K or 1, G or 1, t, s], to broadcast against scores_BKGts.
    """
    k_idx = k_idx if k_idx.ndim == 3 else k_idx[None, None]
    kp = k_idx[:, :, None, None, :]  # [Rb, Rk, 1, 1, s]
    q_pos = q_positions(a, q_idx)[:, None, None, :, None]  # [b, 1, 1, t, 1]
    vis = (q_idx < a.T)[None, None, None, :, None] & (kp < a.S)
    if a.spec is not None:
        vis = vis & a.spec(q_pos, kp)
    if a.kv_lengths is not None:
        vis = vis & (kp < a.kv_lengths[:, None, None, None, None])
    if a.q_segment_ids is not None:
        qs = jnp.take(a.q_segment_ids, jnp.clip(q_idx, 0, a.T - 1), axis=1)
        cols = jnp.clip(k_idx, 0, a.S - 1)
        ks = gather_columns(a.kv_segment_ids[:, None, None, :], cols, 1)[:, :, 0, 0]
        vis = vis & (qs[:, None, None, :, None] == ks[:, :, None, None, :])
    if a.dense is not None:
        d = a.dense if dense_block is None else dense_block
        if d.ndim == 4:
            b, n = d.shape[:2]
            g = a.G if n > 1 else 1
            d = d.reshape(b, n // g, g, *d.shape[2:])
        vis = vis & d
    if extra is not None:
        vis = vis & extra
    return vis


def visit_mask(a: AttentionArgs):
    """bool [B or 1, K or 1, 1, T, S] of the block-visit lists, or None (the dense view)."""
    out = None
    for v in a.visits:
        member = v.membership(-(-a.S // v.block_kv))  # [Bv, Kv, Q, nk]
        rows = np.arange(a.T) // v.block_q
        cols = np.arange(a.S) // v.block_kv
        m = member[:, :, rows][:, :, :, cols][:, :, None]
        out = m if out is None else out & m
    return out


def scores_fp32(a: AttentionArgs, q_BtKGH, k_BsKH, spec: str = "btkgh,bskh->bkgts"):
    """Scaled (and soft-capped) logits in float32: [B, K, G, t, s] (or as ``spec`` lays out)."""
    s = jnp.einsum(
        spec,
        q_BtKGH,
        k_BsKH,
        preferred_element_type=jnp.float32,
        precision=precision(q_BtKGH.dtype),
    )
    s = s * a.scale
    if a.logits_soft_cap is not None:
        # soft cap after scaling (Gemma 2): cap * tanh(s / cap)
        s = a.logits_soft_cap * jnp.tanh(s / a.logits_soft_cap)
    return s


def dropout_keep(a: AttentionArgs, q_idx, k_idx):
    """Dropout keep-mask of the probabilities at query rows ``q_idx`` [t] and keys ``k_idx``.

    The mask is a function of (batch row b, query head n, row i, key j) only: bits =
    threefry2x32(seeds[b, n], (i, j)), kept when bits >= rate · 2³². Every implementation and
    block layout (and the backward, which recomputes it) therefore drops the same entries.

    Args:
      q_idx: int [t]; k_idx: int [s] or [Rb, Rk, s] (as in ``visible``).

    Returns:
      bool [B, K, G, t, s] (heads grouped by key heads).
    """
    k_idx = k_idx if k_idx.ndim == 3 else k_idx[None, None]
    B, K, G = a.B, a.K, a.G
    t, s = q_idx.shape[0], k_idx.shape[-1]
    shape = (B, K, G, t, s)
    seeds = a.dropout_seeds.reshape(B, K, G, 1, 1, 2)
    k0 = jnp.broadcast_to(seeds[..., 0], shape)
    k1 = jnp.broadcast_to(seeds[..., 1], shape)
    x0 = jnp.broadcast_to(q_idx.astype(jnp.uint32)[:, None], shape)
    x1 = jnp.broadcast_to(k_idx.astype(jnp.uint32)[:, :, None, None, :], shape)
    bits = threefry2x32_p.bind(k0, k1, x0, x1)[0]
    threshold = min(int(math.floor(a.dropout_rate * 2.0**32)), 2**32 - 1)
    return bits >= jnp.uint32(threshold)


def regroup(x, heads: int):
    """[B, K, G, ...] -> [B, heads, N / heads, ...]: the same N query heads (n = k·G + g),
    grouped by another head count (a free reshape): key grouping <-> value grouping."""
    B, K, G = x.shape[:3]
    if heads == K:
        return x
    return x.reshape(B, heads, K * G // heads, *x.shape[3:])
