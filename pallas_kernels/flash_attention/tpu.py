"""Pallas Mosaic TPU flash attention kernels: forward, dq and dk/dv (FlashAttention-2).

Kernel layout is head-major: q [B, N, Tp, H], k [B, K, Sp, H], v [B, K, Sp, V] with the
sequence lengths padded to block multiples (api.py transposes and pads). A q head n reads kv
head n // G through the index maps, so kv is never repeated in memory. The grid's last axis
walks a visit list of the tables (scalar prefetch, see pallas_kernels/block_tables.py): index
maps fetch the listed block, steps past the list's count repeat the last block (no DMA) and skip the
compute. Blocks flagged full skip the elementwise mask (that body is traced separately).

Scalar prefetch operands, in order: q_offset [1], kv_len [B], index, count, flags (the tables
[Rb, Rk, rows, steps] flattened; Rk = K when visit lists differ per kv head).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention.common import map_shape, out_struct

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T without a transpose
_NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel options (hashable)."""

    mask: object  # None or a mask spec (its array-data leaves read bits from the block map)
    scale: float
    soft_cap: float | None
    has_segments: bool
    groups: int  # G = N // K
    block_q: int
    block_kv: int


def _logits(cfg, a, b):
    """scale * a @ b.T in fp32, soft-capped; also returns tanh (for the backward) or None."""
    s = jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)
    return common.capped_logits(s, cfg.scale, cfg.soft_cap)


def _run_block(cfg, flags, body):
    """Runs ``body(masked)`` once, choosing the unmasked trace for full blocks."""
    full = common.is_full(flags)
    pl.when(full)(lambda: body(False))
    pl.when(jnp.logical_not(full))(lambda: body(True))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(off_ref, len_ref, idx_ref, cnt_ref, flg_ref, *refs, cfg, ms):
    if cfg.has_segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
        qs_ref = ks_ref = None
    b, n, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    h = n // cfg.groups  # kv head: visit tables may differ per kv head
    pos, cpos = common.map_pos(*ms), common.count_pos(*ms)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def body(masked):
        kb = idx_ref[pos(b, h, i, j)]
        s, _ = _logits(cfg, q_ref[...], k_ref[...])  # [bq, bkv]
        q_pos = off_ref[0] + i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        k_pos = kb * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        vis = common.visible(
            cfg.mask,
            cfg.has_segments,
            flg_ref[pos(b, h, i, j)],
            q_pos,
            k_pos,
            len_ref[b],
            qs_ref[...] if qs_ref is not None else None,
            ks_ref[...] if ks_ref is not None else None,
            masked,
        )
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # Rows with nothing visible yet keep max -inf: shift by 0 so exp gives 0, not NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        # p in v's dtype for the MXU (bf16 inputs), accumulation in fp32.
        pv = jax.lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_new

    @pl.when(j < cnt_ref[cpos(b, h, i)])
    def _compute():
        _run_block(cfg, flg_ref[pos(b, h, i, j)], body)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(l_safe))


def forward(
    q_BNTH, k_BKSH, v_BKSV, q_seg_BT1, kv_seg_B1S, q_offset, kv_len_R, bmap, cfg, interpret
):
    """Flash attention forward on padded head-major inputs.

    Returns:
      o_BNTV (q's dtype) and lse_BNT1 (float32, -inf on rows with no visible key).
    """
    B, N, Tp, H = q_BNTH.shape
    V = v_BKSV.shape[-1]
    bq, bkv, G = cfg.block_q, cfg.block_kv, cfg.groups
    pos = common.map_pos(*map_shape(bmap))
    kv_map = lambda b, n, i, j, off, ln, idx, cnt, flg: (b, n // G, idx[pos(b, n // G, i, j)], 0)
    q_map = lambda b, n, i, j, *_: (b, n, i, 0)
    in_specs = [
        pl.BlockSpec((None, None, bq, H), q_map),
        pl.BlockSpec((None, None, bkv, H), kv_map),
        pl.BlockSpec((None, None, bkv, V), kv_map),
    ]
    args = [q_BNTH, k_BKSH, v_BKSV]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, n, i, j, *_: (b, i, 0)),
            pl.BlockSpec(
                (None, 1, bkv),
                lambda b, n, i, j, off, ln, idx, cnt, flg: (b, 0, idx[pos(b, n // G, i, j)]),
            ),
        ]
        args += [q_seg_BT1, kv_seg_B1S]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(B, N, Tp // bq, map_shape(bmap)[3]),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, V), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, V), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, ms=map_shape(bmap)),
        grid_spec=grid_spec,
        out_shape=[
            out_struct((B, N, Tp, V), q_BNTH.dtype, q_BNTH),
            out_struct((B, N, Tp, 1), jnp.float32, q_BNTH),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*common.scalar_operands(q_offset, kv_len_R, bmap), *args)
