"""Attention for a few queries over a long key/value axis (decoding): ``implementation="decode"``.

A decode step asks for T = 1 (or a few: speculative drafts) queries per sequence against a cache
of S keys. "chunked" is a poor fit there: it loops over kv blocks of 256 inside a loop over query
blocks, and pads k and v to a block multiple (a full copy of the cache every step when the
capacity is not one). "xla" materialises the scores over all S keys, including unused capacity.

This implementation runs one loop over kv blocks sized to stay in a core's cache (split-S
online softmax), with all T·N queries of the batch in each block's two matmuls:

  m ← max(m, rowmax(s)),  l ← l·e^{m_old − m} + rowsum(e^{s − m}),
  acc ← acc·e^{m_old − m} + e^{s − m} v

Scores are key-major (the key block, as it comes out of the cache, is the matmul's row operand)
and the loop reads k and v as [B, S, K·H]. No padding: when S is not a block multiple the last
block is slid back to end at S and the keys it shares with the block before are masked. Only
the kv blocks some query can see are visited (the tables of ``pallas_kernels.block_tables``:
masks, kv_lengths, segment ids, block-visit lists), so a cache's unused capacity past
max(kv_lengths) and the keys outside a sliding window cost nothing. Visit lists per batch row
or kv head gather, at each step, the listed block of every (row, head) (the last one slid back
too); their one query block must hold all T queries. With K_v != K value heads the block's
probabilities are regrouped by value heads for the product with v.

Gradients: a custom VJP through the "xla" reference (O(T·S) memory, small for the T served here).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxattn.ops._attention_args import AttentionArgs
from jaxattn.ops._attention_math import (
    gather_columns,
    precision,
    regroup,
    scores_fp32,
    split_arrays,
    visible,
)
from jaxattn.ops.attention_xla import xla_attention
from pallas_kernels import block_tables

__all__ = [
    "DecodeBlockSizes",
    "decode_attention",
    "decode_over_blocks",
    "decode_unsupported",
    "online_finish",
    "online_init",
    "online_step",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeBlockSizes:
    """Keys per block of the decode implementation, and the most queries it serves under "auto".

    Attributes:
      block_kv: keys per loop iteration, or None: the most (a power of two, at least 16) whose
        key block, B·block·K·H numbers, fits in ``block_bytes`` (with block-visit lists: the
        lists' block_kv).
      block_bytes: the key-block size aimed at when ``block_kv`` is None. A block is copied out
        of the cache (a transpose when K > 1) and read by two matmuls, so it should stay in a
        core's cache: on CPU at 32K keys, batch 4, fp32, 2 MiB blocks measured best (MHA K=32:
        1.1 s at 32 keys vs 2.4 s at 128; GQA K=8: 0.26 s at 128 keys vs 0.66 s at 512; absorbed
        MLA: 0.29 s at 128 keys vs 0.42 s at 512).
      max_q: "auto" picks this implementation for T <= max_q queries per sequence.
    """

    block_kv: int | None = None
    block_bytes: int = 2 << 20
    max_q: int = 16

    def __post_init__(self):
        for name in ("block_kv", "block_bytes", "max_q"):
            value = getattr(self, name)
            if name == "block_kv" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeBlockSizes.{name} must be a positive int, got {value!r}")

    def keys_per_block(self, batch: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
        """``block_kv``, or the power of two that fills ``block_bytes`` (at least 16)."""
        if self.block_kv is not None:
            return self.block_kv
        keys = max(1, self.block_bytes // (batch * kv_heads * head_dim * itemsize))
        return max(16, 1 << (keys.bit_length() - 1))


def decode_unsupported(a: AttentionArgs) -> str | None:
    """Why "decode" cannot serve the call, or None."""
    if a.dropout_rate:
        return "it has no attention dropout (use 'chunked' or 'xla')"
    for v in a.visits:
        if not block_tables.nests(a.T, a.T, v.block_q):
            return (
                f"its one query block holds all T={a.T} queries, more than a visit-list query "
                f"block (block_q={v.block_q})"
            )
        if v.indices.shape[1] > 1 and a.Kv != a.K:
            return "per-head visit lists with separate key and value head counts"
    return None


def _block_kv(a: AttentionArgs, bs: DecodeBlockSizes, itemsize: int) -> int:
    if a.visits and bs.block_kv is None:
        bk = functools.reduce(math.gcd, (v.block_kv for v in a.visits))
    else:
        bk = bs.keys_per_block(a.B, a.K, a.H, itemsize)
    bk = min(bk, a.S)
    for v in a.visits:
        if not block_tables.nests(a.S, bk, v.block_kv):
            raise ValueError(
                f"DecodeBlockSizes.block_kv={bk} must nest inside the visit lists' blocks "
                f"(block_kv={v.block_kv}): use a divisor, or leave it unset"
            )
    return bk


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(a, bk, q, k, v, arrays, tables):
    return _forward(a, bk, q, k, v, arrays, tables)


def _read(bk, k_BSKH, v_BSKV, k_BSX, v_BSX, tables, i, valid):
    """(first key index lo [Rb, Rk, 1], k_BsKH, v_BsKV or None, k_idx [bk] or [B, Rk, bk])
    of step i: the listed block, the last one slid back to end at S. Shared tables slice the
    [B, S, K·H] views ``k_BSX`` / ``v_BSX``; per-row tables gather from the 4-D arrays, with
    zeros for rows whose list is over (``valid`` False: their repeated block may be one they
    do not list, holding anything)."""
    B, S, K, H = k_BSKH.shape
    idx = tables.index[:, :, 0, i]
    if tables.shape[:2] == (1, 1):
        lo = idx[0, 0] * bk
        start = jnp.minimum(lo, S - bk)  # the last block slides back to end at S
        k_blk = jax.lax.dynamic_slice_in_dim(k_BSX, start, bk, axis=1).reshape(B, bk, K, H)
        v_blk = None
        if v_BSX is not None:
            v_blk = jax.lax.dynamic_slice_in_dim(v_BSX, start, bk, axis=1)
            v_blk = v_blk.reshape(B, bk, v_BSKV.shape[2], -1)
        return lo, k_blk, v_blk, start + jnp.arange(bk, dtype=jnp.int32)
    lo = idx * bk  # [Rb, Rk]
    start = jnp.broadcast_to(jnp.minimum(lo, S - bk), (B, idx.shape[1]))
    rows = start[:, None, :] + jnp.arange(bk, dtype=jnp.int32)[None, :, None]  # [B, bk, Rk]
    bi = jnp.arange(B)[:, None, None]
    ok = jnp.broadcast_to(valid, (B, valid.shape[1]))[:, None, :, None]  # [B, 1, Rk, 1]
    k_blk = jnp.where(ok, k_BSKH[bi, rows, jnp.arange(K)[None, None, :]], 0)
    v_blk = None
    if v_BSKV is not None:
        v_blk = jnp.where(ok, v_BSKV[bi, rows, jnp.arange(v_BSKV.shape[2])[None, None, :]], 0)
    k_idx = start[:, :, None] + jnp.arange(bk, dtype=jnp.int32)  # [B, Rk, bk]
    return lo[..., None], k_blk, v_blk, k_idx


def online_init(B: int, K: int, G: int, T: int, Kv: int, V: int):
    """The empty online-softmax carry (m_BKGT = -inf, l_BKGT = 0, acc_BkgTV = 0), fp32."""
    N = K * G
    return (
        jnp.full((B, K, G, T), -jnp.inf, jnp.float32),
        jnp.zeros((B, K, G, T), jnp.float32),
        jnp.zeros((B, Kv, N // Kv, T, V), jnp.float32),
    )


def online_step(carry, s_BKsGT, v_BsKV, Kv: int, dtype):
    """Fold one key block into the carry (the split-S update of the module docstring).

    Args:
      carry: (m_BKGT, l_BKGT, acc_BkgTV) of ``online_init``.
      s_BKsGT: the block's fp32 logits, key-major, -inf where masked.
      v_BsKV: the block's values [B, s, K_v, V] (the matmul runs in ``dtype``, fp32 accumulation).
    """
    m_BKGT, l_BKGT, acc_BkgTV = carry
    B, K, bk, G, T = s_BKsGT.shape
    m_new = jnp.maximum(m_BKGT, s_BKsGT.max(2))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all masked so far: exp(-inf) = 0
    alpha = jnp.exp(m_BKGT - m_safe)
    p_BKsGT = jnp.exp(s_BKsGT - m_safe[:, :, None])
    l_BKGT = l_BKGT * alpha + p_BKsGT.sum(2)
    if Kv == K:
        pv_BkgTV = jnp.einsum(
            "bksgt,bskv->bkgtv",
            p_BKsGT.astype(dtype),
            v_BsKV,
            preferred_element_type=jnp.float32,
            precision=precision(dtype),
        )
    else:  # value grouping: the block's probabilities key-major per value head
        p_BskgT = p_BKsGT.transpose(0, 2, 1, 3, 4).reshape(B, bk, Kv, K * G // Kv, T)
        pv_BkgTV = jnp.einsum(
            "bskgt,bskv->bkgtv",
            p_BskgT.astype(dtype),
            v_BsKV,
            preferred_element_type=jnp.float32,
            precision=precision(dtype),
        )
    return m_new, l_BKGT, acc_BkgTV * regroup(alpha, Kv)[..., None] + pv_BkgTV


def online_finish(carry, Kv: int, out_dtype):
    """(o_BTNV in ``out_dtype``, lse_BNT) of a carry; rows that saw no key: zeros, lse -inf."""
    m_BKGT, l_BKGT, acc_BkgTV = carry
    B, K, G, T = m_BKGT.shape
    V = acc_BkgTV.shape[-1]
    l_safe = jnp.where(l_BKGT == 0, 1.0, l_BKGT)
    o_BkgTV = acc_BkgTV / regroup(l_safe, Kv)[..., None]
    o_BTNV = o_BkgTV.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, V).astype(out_dtype)
    lse_BKGT = jnp.where(l_BKGT == 0, -jnp.inf, m_BKGT + jnp.log(l_safe))
    return o_BTNV, lse_BKGT.reshape(B, K * G, T)


def _forward(a, bk, q_BTNH, k_BSKH, v_BSKV, arrays, tables):
    """(o_BTNV, lse_BNT); ``v_BSKV`` None: the values are the keys (one array, read once)."""
    a = dataclasses.replace(a, **arrays)
    dtype = k_BSKH.dtype
    B, T, N, H = q_BTNH.shape
    K, G, V, Kv = a.K, a.G, a.V, a.Kv
    # Scores are key-major, s_BKsGT: the key block is the matmul's row operand as it comes out
    # of the cache, and the queries, laid out once as q_BKHGT, the column operand.
    q_BKHGT = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 4, 3, 1)
    q_idx = jnp.arange(T, dtype=jnp.int32)
    # The loop reads k and v as [B, S, K·H]: a view with a unit axis (K = 1, as absorbed MLA's
    # row[:, :, None]) would get its own layout inside the loop, i.e. a copy of the whole cache.
    k_BSX = k_BSKH.reshape(B, a.S, K * H)
    v_BSX = None if v_BSKV is None else v_BSKV.reshape(B, a.S, -1)
    cnt = tables.count[:, :, 0]
    valid_of = lambda i: None if tables.shape[:2] == (1, 1) else (i < cnt)

    def body(i, carry):
        valid = valid_of(i)
        lo, k_BsKH, v_BsKV, k_idx = _read(bk, k_BSKH, v_BSKV, k_BSX, v_BSX, tables, i, valid)
        v_BsKV = k_BsKH if v_BSKV is None else v_BsKV
        s_BKsGT = scores_fp32(a, q_BKHGT, k_BsKH, "bkhgt,bskh->bksgt")
        dense_blk = None
        if a.dense is not None:
            cols = k_idx if k_idx.ndim == 3 else k_idx[None, None]
            dense_blk = gather_columns(a.dense, cols, K)
        # keys before lo belong to the previous block (the slid-back last block)
        extra = k_idx >= lo
        extra = extra[None, None] if extra.ndim == 1 else extra[:, :, None, None, :]
        if valid is not None:
            extra = extra & valid[:, :, None, None, None]
        vis = visible(a, q_idx, k_idx, dense_blk, extra)
        s_BKsGT = jnp.where(vis.transpose(0, 1, 4, 2, 3), s_BKsGT, -jnp.inf)
        return online_step(carry, s_BKsGT, v_BsKV, Kv, dtype)

    init = online_init(B, K, G, T, Kv, V)
    carry = jax.lax.fori_loop(0, jnp.max(cnt), body, init)
    return online_finish(carry, Kv, q_BTNH.dtype)


def _fwd(a, bk, q, k, v, arrays, tables):
    return _forward(a, bk, q, k, v, arrays, tables), (q, k, v, arrays, tables)


def _bwd(a, bk, res, cts):
    q, k, v, arrays, tables = res
    full = dataclasses.replace(a, **arrays)
    none = jax.tree.map(lambda _: None, (arrays, tables))
    if v is None:  # shared keys and values: one cotangent, both uses summed by autodiff
        _, vjp = jax.vjp(lambda q, k: xla_attention(full, q, k, k, return_lse=True), q, k)
        return (*vjp(cts), None, *none)
    _, vjp = jax.vjp(lambda q, k, v: xla_attention(full, q, k, v, return_lse=True), q, k, v)
    return (*vjp(cts), *none)


_attention.defvjp(_fwd, _bwd)


def decode_attention(
    a: AttentionArgs,
    q_BTNH,
    k_BSKH,
    v_BSKV,
    return_lse: bool = False,
    block_sizes: DecodeBlockSizes | None = None,
):
    """Split-S attention for few queries: one loop over the visible kv blocks.

    Args:
      a: the validated call (see ``check_args``); ``decode_unsupported(a)`` must be None.
      q_BTNH, k_BSKH, v_BSKV: inputs, one floating dtype; v may have K_v != K heads.
      return_lse: also return lse_BNT (float32, -inf for rows that see no key).
      block_sizes: keys per block (shrinks to S when S is smaller).

    Returns:
      o_BTNV in q's dtype (and lse_BNT). Rows that see no key give zeros and zero gradients.
    """
    bk = _block_kv(a, block_sizes or DecodeBlockSizes(), k_BSKH.dtype.itemsize)
    static, arrays = split_arrays(a)
    segments = None if a.q_segment_ids is None else (a.q_segment_ids, a.kv_segment_ids)
    tables = block_tables.build(
        a.spec,
        q_len=a.T,
        kv_len=a.S,
        block_q=a.T,
        block_kv=bk,
        q_offset=0 if a.q_offset is None else a.q_offset,
        kv_lengths=a.kv_lengths,
        segment_ids=segments,
        dense=a.dense,
        visits=a.visits,
    )
    # The same array as keys and values (absorbed MLA's latent rows): pass and slice it once.
    # Two loop operands aliasing one buffer would make XLA copy the whole cache first.
    v_or_none = None if v_BSKV is k_BSKH else v_BSKV
    o, lse = _attention(static, bk, q_BTNH, k_BSKH, v_or_none, arrays, tables)
    return (o, lse) if return_lse else o


def decode_over_blocks(
    q_BTNH,
    q_pos_BT,
    read,
    num_blocks,
    *,
    tail=(),
    num_kv_heads: int,
    num_v_heads: int | None = None,
    dtype=None,
    scale=None,
    logits_soft_cap=None,
    mask=None,
):
    """The decode implementation over keys that a cache produces block by block (dequantised
    packed blocks): the same split-S online softmax (``online_step``), with explicit key
    positions instead of a kv axis, so any storage layout and eviction policy can feed it.

    Args:
      q_BTNH: queries [B, T, N, H] (cast to ``dtype``).
      q_pos_BT: int32 [B, T] absolute positions of the queries.
      read: ``read(i) -> (kpos_Bs, k_BsKH, v_BsKV)``, block i's key positions (-1: no key),
        keys and values (v None: the keys are the values), each block the same static size.
      num_blocks: int or int32 scalar: blocks ``0 .. num_blocks - 1`` are read (a fori_loop).
      tail: further (kpos_Bs, k_BsKH, v_BsKV or None) blocks folded in after the loop.
      num_kv_heads: K; num_v_heads: K_v (default K).
      dtype: the dtype the blocks arrive in (the matmuls run in it; fp32 accumulation).
      scale: logit scale (default 1/sqrt(H)); logits_soft_cap: as ``dot_product_attention``.
      mask: a ``jaxattn.masks`` spec on (query position, key position), or None; keys at
        position -1 are never visible.

    Returns:
      (o_BTNV in q's dtype, lse_BNT float32; rows that see no key: zeros, -inf).
    """
    B, T, N, H = q_BTNH.shape
    K = num_kv_heads
    Kv = K if num_v_heads is None else num_v_heads
    G = N // K
    dtype = q_BTNH.dtype if dtype is None else jnp.dtype(dtype)
    args = AttentionArgs(
        B=B, T=T, S=0, N=N, K=K, H=H, V=0, Kv=Kv,
        scale=1.0 / math.sqrt(H) if scale is None else scale,
        logits_soft_cap=logits_soft_cap, spec=None, dense=None, q_segment_ids=None,
        kv_segment_ids=None, q_offset=None, kv_lengths=None,
    )  # fmt: skip
    q_BKHGT = q_BTNH.astype(dtype).reshape(B, T, K, G, H).transpose(0, 2, 4, 3, 1)
    qpos_B1T = q_pos_BT[:, None, :]

    def fold(carry, kpos_Bs, k_BsKH, v_BsKV):
        v_BsKV = k_BsKH if v_BsKV is None else v_BsKV
        s_BKsGT = scores_fp32(args, q_BKHGT, k_BsKH.astype(dtype), "bkhgt,bskh->bksgt")
        kpos_Bs1 = kpos_Bs[:, :, None]
        vis_BsT = kpos_Bs1 >= 0
        if mask is not None:
            vis_BsT = vis_BsT & mask(qpos_B1T, kpos_Bs1)
        s_BKsGT = jnp.where(vis_BsT[:, None, :, None, :], s_BKsGT, -jnp.inf)
        return online_step(carry, s_BKsGT, v_BsKV.astype(dtype), Kv, dtype)

    _, k0, v0 = jax.eval_shape(read, 0)
    V = (k0 if v0 is None else v0).shape[-1]
    carry = online_init(B, K, G, T, Kv, V)
    carry = jax.lax.fori_loop(0, num_blocks, lambda i, c: fold(c, *read(i)), carry)
    for block in tail:
        carry = fold(carry, *block)
    return online_finish(carry, Kv, q_BTNH.dtype)
