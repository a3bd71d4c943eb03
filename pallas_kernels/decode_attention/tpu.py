"""Flash-decoding on TPU (Pallas Mosaic): a few queries per sequence over a long KV cache.

Layout. The cache stays where it is, ``[B, C, K, H]``; it is viewed (free reshape) as
``[B, C, K*H]`` and a block is ``[block_kv, hb*H]``: ``block_kv`` cache rows of ``hb`` kv heads,
``hb`` the fewest heads whose lanes fill whole 128-lane tiles (1 for H = 128, 256, or K = 1).
The queries of one kv head (G heads x T tokens, rows ordered (g, t)) are packed into the rows
of one ``[G*T, H]`` block, so each step is a ``[G*T, H] x [H, block_kv]`` matmul and the kv
head is never repeated.

Grid ``(B, K/hb, num_splits, blocks_per_split)``: the kv axis is cut into ``num_splits``
contiguous splits (flash-decoding); each split keeps an online softmax in VMEM scratch and
writes its unnormalised partial ``(acc, m, l)``; ``combine_splits`` merges the splits with the
log-sum-exp rule. ``kv_lengths`` and the query offsets (query t of sequence b sits at position
``q_offsets[b] + t``) are scalar-prefetched: the index maps clamp the block index into the live
range of the sequence, so dead steps repeat the previous block index and Pallas issues no DMA
for them, and ``pl.when`` skips their compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention.blocks import live_block_range, visible_keys

__all__ = [
    "decode_partials",
    "combine_splits",
    "heads_per_block",
    "kv_block_index",
    "block_is_live",
    "MASK_VALUE",
]

# Finite, far below any real score: a fully masked row keeps m finite, so exp(m_prev - m_new)
# never becomes exp(-inf + inf) = NaN. Masked probabilities are also zeroed explicitly.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LANES = 128  # m and l are kept lane-replicated over one 128-lane tile (lane-dense stores)


def heads_per_block(num_kv_heads: int, h: int, v: int) -> int:
    """Fewest kv heads per block whose H and V lanes fill whole 128-lane tiles (else all)."""
    for hb in range(1, num_kv_heads + 1):
        if num_kv_heads % hb == 0 and (hb * h) % _LANES == 0 and (hb * v) % _LANES == 0:
            return hb
    return num_kv_heads


def kv_block_index(
    j, kv_len, *, T: int, block_kv: int, window: int | None, cache_len: int, q_start=None
):
    """Cache block fetched at grid step j: j clamped into the live range of the sequence.

    Consecutive dead steps thus repeat one block index and Pallas issues no DMA for them.
    Broadcasts over array ``j`` / ``kv_len``; ``q_start`` defaults to kv_len - T.
    """
    lo_blk, hi_blk = live_block_range(
        kv_len, T=T, block_kv=block_kv, window=window, cache_len=cache_len, q_start=q_start
    )
    return jnp.minimum(jnp.maximum(j, lo_blk), hi_blk)


def block_is_live(
    j, kv_len, *, T: int, block_kv: int, window: int | None, cache_len: int, q_start=None
):
    """Whether block j holds a key that one of the T queries can see (else compute skips)."""
    q_start = kv_len - T if q_start is None else q_start
    lo_blk, hi_blk = live_block_range(
        kv_len, T=T, block_kv=block_kv, window=window, cache_len=cache_len, q_start=q_start
    )
    n_keys = visible_keys(kv_len, q_start, T=T, cache_len=cache_len)
    return (j >= lo_blk) & (j <= hi_blk) & (j * block_kv < n_keys)


def _kernel(
    lens_ref,
    offs_ref,
    q_ref,
    k_ref,
    *refs,
    T,
    H,
    V,
    C,
    hb,
    block_kv,
    blocks_per_split,
    scale,
    soft_cap,
    window,
    shared_kv,
):
    # With shared_kv the value block is the key block (one DMA of the cache, as in MLA).
    if shared_kv:
        v_ref, (acc_out, m_out, l_out, acc_scr, m_scr, l_scr) = k_ref, refs
    else:
        v_ref, acc_out, m_out, l_out, acc_scr, m_scr, l_scr = refs
    b, s, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kv_len, q0 = lens_ref[b], offs_ref[b]  # query t sits at position q0 + t
    j = s * blocks_per_split + i
    R = q_ref.shape[1]  # G * T rows

    @pl.when(i == 0)
    def _init():
        acc_scr[...] = jnp.zeros_like(acc_scr)
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)

    live = block_is_live(j, kv_len, T=T, block_kv=block_kv, window=window, cache_len=C, q_start=q0)
    n_keys = jnp.minimum(kv_len, C)  # keys that exist: j < kv_len and j < C

    start = j * block_kv
    # A block whose every key is visible to every row (interior of the cache, the usual case)
    # needs no iota, mask or row zeroing: that VPU work is comparable to the block's DMA time.
    full = (start + block_kv <= jnp.minimum(q0 + 1, n_keys)) & (
        True if window is None else start >= q0 + T - window
    )

    def update(masked: bool):
        if masked:
            k_pos_RS = start + jax.lax.broadcasted_iota(jnp.int32, (R, block_kv), 1)
            t_RS = jax.lax.broadcasted_iota(jnp.int32, (R, block_kv), 0)
            t_RS = jax.lax.rem(t_RS, T) if T > 1 else jnp.zeros_like(t_RS)  # rows are (g, t)
            q_pos_RS = q0 + t_RS
            visible_RS = (k_pos_RS <= q_pos_RS) & (k_pos_RS < n_keys)
            if window is not None:
                visible_RS &= q_pos_RS - k_pos_RS < window
            # Rows past kv_len (including the padding of a partial last block, which may hold
            # garbage or NaN) are zeroed: p = 0 there, but 0 * NaN would still poison p @ v.
            row_ok_S1 = start + jax.lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0) < n_keys
        for hh in range(hb):  # static: hb is 1 for H = 128/256 or K = 1
            q_RH = q_ref[hh]
            k_SH = k_ref[:, hh * H : (hh + 1) * H]
            v_SV = v_ref[:, hh * V : (hh + 1) * V]
            prec = jax.lax.Precision.HIGHEST if q_RH.dtype == jnp.float32 else None
            # Scores in fp32 (MXU accumulates in fp32); scale after the matmul, not on bf16 q.
            dims = (((1,), (1,)), ((), ()))
            s_RS = jax.lax.dot_general(
                q_RH, k_SH, dims, preferred_element_type=jnp.float32, precision=prec
            )
            s_RS = s_RS * scale
            if soft_cap is not None:
                s_RS = soft_cap * jnp.tanh(s_RS / soft_cap)
            if masked:
                s_RS = jnp.where(visible_RS, s_RS, MASK_VALUE)
                v_SV = jnp.where(row_ok_S1, v_SV, jnp.zeros_like(v_SV))
            m_prev_R1 = m_scr[hh][:, :1]
            m_new_R1 = jnp.maximum(m_prev_R1, jnp.max(s_RS, axis=1, keepdims=True))
            alpha_R1 = jnp.exp(m_prev_R1 - m_new_R1)
            p_RS = jnp.exp(s_RS - m_new_R1)
            if masked:
                p_RS = jnp.where(visible_RS, p_RS, 0.0)
            l_new_R1 = alpha_R1 * l_scr[hh][:, :1] + jnp.sum(p_RS, axis=1, keepdims=True)
            # p in v's dtype for the MXU (bf16 x bf16 -> fp32), as flash attention does.
            dims = (((1,), (0,)), ((), ()))
            pv_RV = jax.lax.dot_general(
                p_RS.astype(v_SV.dtype),
                v_SV,
                dims,
                preferred_element_type=jnp.float32,
                precision=prec,
            )
            acc_scr[hh] = alpha_R1 * acc_scr[hh] + pv_RV
            m_scr[hh] = jnp.broadcast_to(m_new_R1, (R, _LANES))
            l_scr[hh] = jnp.broadcast_to(l_new_R1, (R, _LANES))

    pl.when(live & full)(lambda: update(masked=False))
    pl.when(live & jnp.logical_not(full))(lambda: update(masked=True))

    @pl.when(i == blocks_per_split - 1)
    def _finish():
        acc_out[...] = acc_scr[...]
        m_out[...] = m_scr[...]
        l_out[...] = l_scr[...]


def decode_partials(
    q_BKRH,
    k_BCKH,
    v_BCKV,
    kv_lengths_B,
    q_offsets_B=None,
    *,
    T,
    block_kv,
    num_splits,
    scale,
    soft_cap=None,
    window=None,
    shared_kv=False,
    interpret=False,
):
    """Per-split partial attention: the Pallas call.

    Args:
      q_BKRH: queries [B, K, R, H], R = G*T rows ordered (g, t).
      k_BCKH: key cache [B, C, K, H].
      v_BCKV: value cache [B, C, K, V].
      kv_lengths_B: int32 [B].
      q_offsets_B: int32 [B], position of query 0 of each sequence (default kv_lengths - T).
      T: queries per sequence; block_kv: cache rows per block (== C, or a multiple of 8);
      num_splits: kv splits; scale, soft_cap, window: as in ``decode_attention``.
      shared_kv: ``v_BCKV`` is ``k_BCKH``: pass and DMA the cache once, read v from the k block.
      interpret: False, or ``pltpu.InterpretParams`` to run on CPU.

    Returns:
      acc_BSKRV (unnormalised p @ v), m_BSKR and l_BSKR (running max and sum), float32.
    """
    B, C, K, H = k_BCKH.shape
    V = v_BCKV.shape[-1]
    R = q_BKRH.shape[2]
    hb = heads_per_block(K, H, V)
    num_blocks = pl.cdiv(C, block_kv)
    bps = pl.cdiv(num_blocks, num_splits)

    def q_map(b, h, s, i, lens_ref, offs_ref):
        return b, h, 0, 0

    def kv_map(b, h, s, i, lens_ref, offs_ref):
        j = kv_block_index(
            s * bps + i, lens_ref[b], T=T, block_kv=block_kv, window=window, cache_len=C,
            q_start=offs_ref[b],
        )  # fmt: skip
        return b, j, h

    def out_map(b, h, s, i, lens_ref, offs_ref):
        return b, s, h, 0, 0

    sq = pl.squeezed
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, K // hb, num_splits, bps),
        in_specs=[
            pl.BlockSpec((sq, hb, R, H), q_map),
            pl.BlockSpec((sq, block_kv, hb * H), kv_map),
        ]
        + ([] if shared_kv else [pl.BlockSpec((sq, block_kv, hb * V), kv_map)]),
        out_specs=[
            pl.BlockSpec((sq, sq, hb, R, V), out_map),
            pl.BlockSpec((sq, sq, hb, R, _LANES), out_map),
            pl.BlockSpec((sq, sq, hb, R, _LANES), out_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((hb, R, V), jnp.float32),
            pltpu.VMEM((hb, R, _LANES), jnp.float32),
            pltpu.VMEM((hb, R, _LANES), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _kernel,
        T=T,
        H=H,
        V=V,
        C=C,
        hb=hb,
        block_kv=block_kv,
        blocks_per_split=bps,
        scale=scale,
        soft_cap=soft_cap,
        window=window,
        shared_kv=shared_kv,
    )
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((B, num_splits, K, R, V), jnp.float32),
            jax.ShapeDtypeStruct((B, num_splits, K, R, _LANES), jnp.float32),
            jax.ShapeDtypeStruct((B, num_splits, K, R, _LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="decode_attention",
    )(
        kv_lengths_B.astype(jnp.int32),
        (kv_lengths_B - T if q_offsets_B is None else q_offsets_B).astype(jnp.int32),
        q_BKRH,
        k_BCKH.reshape(B, C, K * H),  # free: merges the two minor dims
        *([] if shared_kv else [v_BCKV.reshape(B, C, K * V)]),
    )
    return acc, m[..., 0], l[..., 0]


def combine_splits(acc_BSKRV, m_BSKR, l_BSKR):
    """Merge split partials with the log-sum-exp rule.

    Returns:
      o_BKRV (float32, zero for rows with no visible key) and lse_BKR (-inf there).
    """
    m_BKR = jnp.max(m_BSKR, axis=1)
    # Splits that saw nothing have l = 0 and acc = 0, so their (finite) weight adds nothing.
    w_BSKR = jnp.exp(m_BSKR - m_BKR[:, None])
    l_BKR = jnp.sum(w_BSKR * l_BSKR, axis=1)
    acc_BKRV = jnp.sum(w_BSKR[..., None] * acc_BSKRV, axis=1)
    seen_BKR = l_BKR > 0
    o_BKRV = acc_BKRV / jnp.where(seen_BKR, l_BKR, 1.0)[..., None]
    lse_BKR = jnp.where(seen_BKR, m_BKR + jnp.log(jnp.where(seen_BKR, l_BKR, 1.0)), -jnp.inf)
    return o_BKRV, lse_BKR
