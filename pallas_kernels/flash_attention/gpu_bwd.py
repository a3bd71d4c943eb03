"""Pallas Mosaic GPU flash attention backward: a dq kernel and a dk/dv kernel.

The same FlashAttention-2 recurrences as tpu_bwd.py (P recomputed from the forward's
log-sum-exp, dS = P * (dP - delta)), on the GPU building blocks of gpu.py: the CTA's own
tiles are loaded once by TMA, the tiles it visits stream through ``plgpu.emit_pipeline``
along the block map's visit list, and accumulators live in registers. The dk/dv kernel
visits, per kv tile, the G query heads that share it and each one's visible q tiles (the
transposed block map), so no per-q-head dk/dv is ever materialised. It works on transposed
scores [block_kv, block_q], so every product is a @ b or a @ b.T.

q, dO, lse and delta are passed with heads folded into rows ([B, N * Tp, .]) so that a
visited q tile of head n, block t is row block n * (Tp / block_q) + t.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention.gpu import (
    Layouts,
    _cols,
    _rows,
    by_fullness,
    smem_tile,
    swizzle_transforms,
)


def _masked_p(s, lse, vis):
    """exp(s - lse) with invisible pairs (and rows with lse = +inf) at exactly 0."""
    p = jnp.exp(s - lse)
    return p if vis is None else jnp.where(vis, p, 0.0)


def _dq_kernel(*refs, cfg, ms, lay):
    if cfg.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref,
         off_ref, len_ref, idx_ref, cnt_ref, flg_ref, dq_ref,
         q_smem, do_smem, lse_smem, dl_smem, qs_smem, bar) = refs  # fmt: skip
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref,
         off_ref, len_ref, idx_ref, cnt_ref, flg_ref, dq_ref,
         q_smem, do_smem, lse_smem, dl_smem, bar) = refs  # fmt: skip
        qs_ref = ks_ref = qs_smem = None
    bq, bkv, G = cfg.block_q, cfg.block_kv, cfg.groups
    n, i, b = lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("batch")
    kvh = lax.div(n, jnp.int32(G))
    pos, cpos = common.map_pos(*ms), common.count_pos(*ms)
    q0 = i * bq
    H = q_smem.shape[-1]

    for src, dst in ((q_ref, q_smem), (do_ref, do_smem), (lse_ref, lse_smem), (dl_ref, dl_smem)):
        plgpu.copy_gmem_to_smem(src.at[b, n, pl.ds(q0, bq)], dst, bar.at[0])
    if qs_ref is not None:
        plgpu.copy_gmem_to_smem(qs_ref.at[b, pl.ds(q0, bq)], qs_smem, bar.at[0])
    plgpu.barrier_wait(bar.at[0])

    s_shape = (bq, bkv)
    lse = _rows(lay.load(lse_smem, lay.row), s_shape)
    delta = _rows(lay.load(dl_smem, lay.row), s_shape)
    q_seg = None if qs_smem is None else _rows(lay.load(qs_smem, lay.row), s_shape)
    kv_len, offset = len_ref[b], off_ref[0]

    def block(step, k_smem, v_smem, ks_smem, acc, masked):
        kb = idx_ref[pos(b, kvh, i, step)]
        s_raw = lay.matmul(q_smem, k_smem, s_shape, transpose_b=True)
        s, t = common.capped_logits(s_raw, cfg.scale, cfg.soft_cap)
        rows, cols = lay.iota(s_shape)
        k_seg = None if ks_smem is None else _cols(lay.load(ks_smem, lay.col), s_shape)
        vis = common.visible(
            cfg.mask, cfg.has_segments, flg_ref[pos(b, kvh, i, step)],
            offset + q0 + rows, kb * bkv + cols, kv_len, q_seg, k_seg, masked,
        )  # fmt: skip
        p = _masked_p(s, lse, vis)
        dp = lay.matmul(do_smem, v_smem, s_shape, transpose_b=True)
        ds = common.score_grad(p, dp, delta, t)
        return acc + lay.matmul(ds.astype(k_smem.dtype), k_smem, (bq, H))

    def body(indices, k_smem, v_smem, *rest):
        *seg, acc = rest
        ks_smem = seg[0] if seg else None
        step = indices[0]
        return by_fullness(
            flg_ref[pos(b, kvh, i, step)],
            lambda masked: block(step, k_smem, v_smem, ks_smem, acc, masked),
        )

    kv_block = lambda step: (idx_ref[pos(b, kvh, i, step)], 0)
    V = v_ref.shape[-1]
    in_specs = [
        plgpu.BlockSpec((bkv, H), kv_block, transforms=swizzle_transforms(k_ref.dtype, H)),
        plgpu.BlockSpec((bkv, V), kv_block, transforms=swizzle_transforms(v_ref.dtype, V)),
    ]
    operands = [k_ref.at[b, kvh], v_ref.at[b, kvh]]
    if ks_ref is not None:
        in_specs.append(plgpu.BlockSpec((bkv,), lambda step: (idx_ref[pos(b, kvh, i, step)],)))
        operands.append(ks_ref.at[b])
    acc = plgpu.emit_pipeline(
        body,
        grid=(cnt_ref[cpos(b, kvh, i)],),
        in_specs=in_specs,
        max_concurrent_steps=cfg.max_concurrent_steps,
        init_carry=lay.cast(jnp.zeros((bq, H), jnp.float32), lay.acc),
    )(*operands)
    dq_smem = q_smem  # q's tile is free once the loop is done
    dq_smem[...] = (acc * cfg.scale).astype(dq_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[b, n, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(*refs, cfg, ms, lay, q_blocks):
    if cfg.has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref,
         off_ref, len_ref, idx_ref, cnt_ref, flg_ref, dk_ref, dv_ref,
         k_smem, v_smem, ks_smem, bar) = refs  # fmt: skip
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref,
         off_ref, len_ref, idx_ref, cnt_ref, flg_ref, dk_ref, dv_ref,
         k_smem, v_smem, bar) = refs  # fmt: skip
        qs_ref = ks_ref = ks_smem = None
    bq, bkv, G = cfg.block_q, cfg.block_kv, cfg.groups
    kvh, j, b = lax.axis_index("heads"), lax.axis_index("kv"), lax.axis_index("batch")
    pos, cpos = common.map_pos(*ms), common.count_pos(*ms)
    k0 = j * bkv
    H, V = k_smem.shape[-1], v_smem.shape[-1]

    plgpu.copy_gmem_to_smem(k_ref.at[b, kvh, pl.ds(k0, bkv)], k_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[b, kvh, pl.ds(k0, bkv)], v_smem, bar.at[0])
    if ks_ref is not None:
        plgpu.copy_gmem_to_smem(ks_ref.at[b, pl.ds(k0, bkv)], ks_smem, bar.at[0])
    plgpu.barrier_wait(bar.at[0])

    s_shape = (bkv, bq)
    k_seg = None if ks_smem is None else _rows(lay.load(ks_smem, lay.row), s_shape)
    kv_len, offset = len_ref[b], off_ref[0]

    def block(step, q_smem, do_smem, lse_smem, dl_smem, qs_smem, carry, masked):
        dk, dv = carry
        qb = idx_ref[pos(b, kvh, j, step)]
        s_raw = lay.matmul(k_smem, q_smem, s_shape, transpose_b=True)
        s, t = common.capped_logits(s_raw, cfg.scale, cfg.soft_cap)
        rows, cols = lay.iota(s_shape)
        q_seg = None if qs_smem is None else _cols(lay.load(qs_smem, lay.col), s_shape)
        vis = common.visible(
            cfg.mask, cfg.has_segments, flg_ref[pos(b, kvh, j, step)],
            offset + qb * bq + cols, k0 + rows, kv_len, q_seg, k_seg, masked,
        )  # fmt: skip
        p = _masked_p(s, _cols(lay.load(lse_smem, lay.col), s_shape), vis)
        dv = dv + lay.matmul(p.astype(do_smem.dtype), do_smem, (bkv, V))
        dp = lay.matmul(v_smem, do_smem, s_shape, transpose_b=True)
        ds = common.score_grad(p, dp, _cols(lay.load(dl_smem, lay.col), s_shape), t)
        dk = dk + lay.matmul(ds.astype(q_smem.dtype), q_smem, (bkv, H))
        return dk, dv

    def body(indices, q_smem, do_smem, lse_smem, dl_smem, *rest):
        *seg, carry = rest
        qs_smem = seg[0] if seg else None
        step = indices[1]
        args = (step, q_smem, do_smem, lse_smem, dl_smem, qs_smem, carry)
        return by_fullness(flg_ref[pos(b, kvh, j, step)], lambda masked: block(*args, masked))

    # Row block of (q head kvh * G + g, q tile idx[step]) in the [N * Tp] folded layout.
    q_row = lambda g, step: (kvh * G + g) * q_blocks + idx_ref[pos(b, kvh, j, step)]
    dt = q_ref.dtype
    tile_at = lambda g, s: (q_row(g, s), 0)
    row_at = lambda g, s: (q_row(g, s),)
    in_specs = [
        plgpu.BlockSpec((bq, H), tile_at, transforms=swizzle_transforms(dt, H)),
        plgpu.BlockSpec((bq, V), tile_at, transforms=swizzle_transforms(dt, V)),
        plgpu.BlockSpec((bq,), row_at),
        plgpu.BlockSpec((bq,), row_at),
    ]
    operands = [q_ref.at[b], do_ref.at[b], lse_ref.at[b], dl_ref.at[b]]
    if qs_ref is not None:
        in_specs.append(plgpu.BlockSpec((bq,), lambda g, s: (idx_ref[pos(b, kvh, j, s)],)))
        operands.append(qs_ref.at[b])
    zeros = lambda d: lay.cast(jnp.zeros((bkv, d), jnp.float32), lay.acc)
    dk, dv = plgpu.emit_pipeline(
        body,
        grid=(G, cnt_ref[cpos(b, kvh, j)]),
        in_specs=in_specs,
        max_concurrent_steps=cfg.max_concurrent_steps,
        init_carry=(zeros(H), zeros(V)),
    )(*operands)
    dk_smem, dv_smem = k_smem, v_smem  # k's and v's tiles are free once the loop is done
    dk_smem[...] = (dk * cfg.scale).astype(dk_smem.dtype)
    dv_smem[...] = dv.astype(dv_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[b, kvh, pl.ds(k0, bkv)])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[b, kvh, pl.ds(k0, bkv)])
    plgpu.wait_smem_to_gmem(0)


def backward_dq(q, k, v, do, lse_BNT, delta_BNT, q_seg, kv_seg, q_offset, kv_len, bmap, cfg,
                interpret):  # fmt: skip
    """dq [B, N, Tp, H] on padded head-major inputs (lse +inf on rows with no visible key)."""
    B, N, Tp, H = q.shape
    bq, dt = cfg.block_q, q.dtype
    row = plgpu.SMEM((bq,), jnp.float32)
    scratch = [smem_tile((bq, H), dt), smem_tile((bq, v.shape[-1]), dt), row, row]
    args = [q, k, v, do, lse_BNT, delta_BNT]
    if cfg.has_segments:
        scratch.append(plgpu.SMEM((bq,), jnp.int32))
        args += [q_seg, kv_seg]
    scratch.append(plgpu.Barrier(num_arrivals=4 + cfg.has_segments, num_barriers=1))
    kernel = plgpu.kernel(
        functools.partial(
            _dq_kernel, cfg=cfg, ms=common.map_shape(bmap), lay=Layouts(bool(interpret))
        ),
        out_type=common.out_struct(q.shape, dt, q),
        scratch_types=scratch,
        grid=(N, Tp // bq, B),
        grid_names=("heads", "q", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    return kernel(*args, *common.scalar_operands(q_offset, kv_len, bmap))


def backward_dkv(q, k, v, do, lse_BNT, delta_BNT, q_seg, kv_seg, q_offset, kv_len, bmap_t, cfg,
                 interpret):  # fmt: skip
    """(dk [B, K, Sp, H], dv [B, K, Sp, V]) from the transposed block map ``bmap_t``."""
    B, N, Tp, H = q.shape
    _, K, Sp, V = v.shape
    bkv, dt = cfg.block_kv, q.dtype
    fold = lambda x: x.reshape(B, N * Tp, *x.shape[3:])
    scratch = [smem_tile((bkv, H), dt), smem_tile((bkv, V), dt)]
    args = [fold(q), k, v, fold(do), fold(lse_BNT), fold(delta_BNT)]
    if cfg.has_segments:
        scratch.append(plgpu.SMEM((bkv,), jnp.int32))
        args += [q_seg, kv_seg]
    scratch.append(plgpu.Barrier(num_arrivals=2 + cfg.has_segments, num_barriers=1))
    kernel = plgpu.kernel(
        functools.partial(
            _dkv_kernel,
            cfg=cfg,
            ms=common.map_shape(bmap_t),
            lay=Layouts(bool(interpret)),
            q_blocks=Tp // cfg.block_q,
        ),
        out_type=[common.out_struct(k.shape, dt, k), common.out_struct(v.shape, dt, v)],
        scratch_types=scratch,
        grid=(K, Sp // bkv, B),
        grid_names=("heads", "kv", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    return kernel(*args, *common.scalar_operands(q_offset, kv_len, bmap_t))
