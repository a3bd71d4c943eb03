"""Pallas Mosaic TPU flash attention backward: a dq kernel and a dk/dv kernel.

FlashAttention-2 style: P is recomputed from the forward's log-sum-exp, and with
delta = rowsum(dO * O) - dlse (computed in XLA) the score gradient is
dS = P * (dP - delta), dP = dO V^T. The dq kernel walks kv blocks per q block; the dk/dv
kernel walks, per kv block, the G query heads that share it and their visible q blocks
(a transposed block map), accumulating in VMEM, so no per-q-head dk/dv is materialised.
The dk/dv kernel works on transposed scores [block_kv, block_q] so every matmul is NN or NT.
lse and delta are passed lane-dense as [B, N, 1, T] (rows); the dq kernel turns its row into
a column in VMEM, so no lane-padded [.., T, 1] array is written to HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import common, tpu
from pallas_kernels.flash_attention.tpu import _NN, _NT


def _dq_kernel(off_ref, len_ref, idx_ref, cnt_ref, flg_ref, *refs, cfg, ms):
    if cfg.has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, acc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, acc = refs
        qs_ref = ks_ref = None
    b, n, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    h = n // cfg.groups
    pos, cpos = common.map_pos(*ms), common.count_pos(*ms)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def body(masked):
        kb = idx_ref[pos(b, h, i, j)]
        k = k_ref[...]
        s, t = tpu._logits(cfg, q_ref[...], k)  # [bq, bkv]
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
        # lse and delta arrive lane-dense as rows [1, bq]; as columns [bq, 1] here.
        lse, delta = jnp.expand_dims(lse_ref[0], -1), jnp.expand_dims(dl_ref[0], -1)
        p = jnp.exp(s - lse)  # lse is +inf on empty rows: p = 0 there
        do = do_ref[...]
        dp = jax.lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = common.score_grad(p, dp, delta, t)
        acc[...] += jax.lax.dot_general(
            ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32
        )

    @pl.when(j < cnt_ref[cpos(b, h, i)])
    def _compute():
        tpu._run_block(cfg, flg_ref[pos(b, h, i, j)], body)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, len_ref, idx_ref, cnt_ref, flg_ref, *refs, cfg, ms):
    if cfg.has_segments:
        (
            q_ref,
            k_ref,
            v_ref,
            do_ref,
            lse_ref,
            dl_ref,
            qs_ref,
            ks_ref,
            dk_ref,
            dv_ref,
            dk_acc,
            dv_acc,
        ) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
        qs_ref = ks_ref = None
    b, h, jk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g, c = pl.program_id(3), pl.program_id(4)
    pos, cpos = common.map_pos(*ms), common.count_pos(*ms)

    @pl.when((g == 0) & (c == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def body(masked):
        qb = idx_ref[pos(b, h, jk, c)]
        q = q_ref[...]
        s, t = tpu._logits(cfg, k_ref[...], q)  # transposed scores [bkv, bq]
        k_pos = jk * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        q_pos = off_ref[0] + qb * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        vis = common.visible(
            cfg.mask,
            cfg.has_segments,
            flg_ref[pos(b, h, jk, c)],
            q_pos,
            k_pos,
            len_ref[b],
            qs_ref[...] if qs_ref is not None else None,
            ks_ref[...] if ks_ref is not None else None,
            masked,
        )
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
        p = jnp.exp(s - lse_ref[...])  # [bkv, bq]; lse row is +inf on empty query rows
        do = do_ref[...]
        dv_acc[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32
        )
        dp = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        ds = common.score_grad(p, dp, dl_ref[...], t)
        dk_acc[...] += jax.lax.dot_general(
            ds.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32
        )

    @pl.when(c < cnt_ref[cpos(b, h, jk)])
    def _compute():
        tpu._run_block(cfg, flg_ref[pos(b, h, jk, c)], body)

    @pl.when((g == pl.num_programs(3) - 1) & (c == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


_PARAMS4 = ("parallel", "parallel", "parallel", "arbitrary")


def backward_dq(
    q, k, v, do, lse_BN1T, delta_BN1T, q_seg_BT1, kv_seg_B1S, q_offset, kv_len, bmap, cfg, interpret
):
    """dq_BNTH from padded head-major inputs; ``bmap`` lists kv blocks per q block."""
    B, N, Tp, H = q.shape
    V = v.shape[-1]
    bq, bkv, G = cfg.block_q, cfg.block_kv, cfg.groups
    pos = common.map_pos(*common.map_shape(bmap))
    kv_map = lambda b, n, i, j, off, ln, idx, cnt, flg: (b, n // G, idx[pos(b, n // G, i, j)], 0)
    q_map = lambda b, n, i, j, *_: (b, n, i, 0)
    row_map = lambda b, n, i, j, *_: (b, n, 0, i)
    in_specs = [
        pl.BlockSpec((None, None, bq, H), q_map),
        pl.BlockSpec((None, None, bkv, H), kv_map),
        pl.BlockSpec((None, None, bkv, V), kv_map),
        pl.BlockSpec((None, None, bq, V), q_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
    ]
    args = [q, k, v, do, lse_BN1T, delta_BN1T]
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
        grid=(B, N, Tp // bq, common.map_shape(bmap)[3]),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, H), q_map),
        scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, ms=common.map_shape(bmap)),
        grid_spec=grid_spec,
        out_shape=common.out_struct(q.shape, q.dtype, q),
        compiler_params=pltpu.CompilerParams(dimension_semantics=_PARAMS4),
        interpret=interpret,
        name="flash_attention_dq",
    )(*common.scalar_operands(q_offset, kv_len, bmap), *args)


def backward_dkv(
    q,
    k,
    v,
    do,
    lse_BN1T,
    delta_BN1T,
    q_seg_B1T,
    kv_seg_BS1,
    q_offset,
    kv_len,
    bmap_t,
    cfg,
    interpret,
):
    """(dk_BKSH, dv_BKSV) from padded head-major inputs; ``bmap_t`` lists q blocks per kv
    block (transposed)."""
    B, N, Tp, H = q.shape
    _, K, Sp, V = v.shape
    bq, bkv, G = cfg.block_q, cfg.block_kv, cfg.groups
    pos = common.map_pos(*common.map_shape(bmap_t))
    q_map = lambda b, h, j, g, c, off, ln, idx, cnt, flg: (b, h * G + g, idx[pos(b, h, j, c)], 0)
    row_map = lambda b, h, j, g, c, off, ln, idx, cnt, flg: (b, h * G + g, 0, idx[pos(b, h, j, c)])
    kv_map = lambda b, h, j, g, c, *_: (b, h, j, 0)
    in_specs = [
        pl.BlockSpec((None, None, bq, H), q_map),
        pl.BlockSpec((None, None, bkv, H), kv_map),
        pl.BlockSpec((None, None, bkv, V), kv_map),
        pl.BlockSpec((None, None, bq, V), q_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
    ]
    args = [q, k, v, do, lse_BN1T, delta_BN1T]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec(
                (None, 1, bq),
                lambda b, h, j, g, c, off, ln, idx, cnt, flg: (b, 0, idx[pos(b, h, j, c)]),
            ),
            pl.BlockSpec((None, bkv, 1), lambda b, h, j, g, c, *_: (b, j, 0)),
        ]
        args += [q_seg_B1T, kv_seg_BS1]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(B, K, Sp // bkv, G, common.map_shape(bmap_t)[3]),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bkv, H), kv_map),
            pl.BlockSpec((None, None, bkv, V), kv_map),
        ],
        scratch_shapes=[pltpu.VMEM((bkv, H), jnp.float32), pltpu.VMEM((bkv, V), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, ms=common.map_shape(bmap_t)),
        grid_spec=grid_spec,
        out_shape=[common.out_struct(k.shape, k.dtype, k), common.out_struct(v.shape, v.dtype, v)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_PARAMS4 + ("arbitrary",)),
        interpret=interpret,
        name="flash_attention_dkv",
    )(*common.scalar_operands(q_offset, kv_len, bmap_t), *args)
