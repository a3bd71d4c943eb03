"""Pallas Mosaic GPU flash attention forward (Hopper: TMA copies, wgmma, online softmax).

Same layout and visit tables as the TPU kernels (see tpu.py and ../block_tables.py): head-major,
padded q [B, N, Tp, H], k [B, K, Sp, H], v [B, K, Sp, V]; query head n reads kv head n // G
(never repeated in memory). One CTA (one warpgroup) owns a query tile of one head; it loads
the tile into shared memory once, then ``plgpu.emit_pipeline`` streams exactly the kv blocks
of its visit list (a dynamic trip count: causal masks do about half the work, windows
O(T * window)) through a multi-buffered shared-memory ring while the previous block is in
the tensor cores. Scores and the output accumulator live in registers (wgmma layout), in fp32.

The block-map operands (visit lists, counts, flags), q_offset and kv lengths are read as
scalars from global memory. Segment ids travel as int32 tiles next to q and k.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import common

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel options (hashable)."""

    mask: object
    scale: float
    soft_cap: float | None
    has_segments: bool
    groups: int
    block_q: int
    block_kv: int
    max_concurrent_steps: int = 2


def swizzle_transforms(dtype, minor: int):
    """(tiling, swizzle) for a 2-D tile whose minor dim holds ``minor`` elements."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (
        plgpu.TilingTransform((8, swizzle // itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )


@dataclasses.dataclass(frozen=True)
class Layouts:
    """Register layouts of the wgmma accumulator, its rows and its columns.

    The GPU interpreter runs on plain arrays and has no layouts, so ``interpret`` makes every
    layout request a no-op; compiled kernels get the wgmma layouts.
    """

    interpret: bool

    def cast(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def load(self, ref, layout):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout)

    @property
    def acc(self):
        return plgpu.Layout.WGMMA

    @property
    def row(self):
        return plgpu.Layout.WGMMA.reduce(1)

    @property
    def col(self):
        return plgpu.Layout.WGMMA.reduce(0)

    def iota(self, shape):
        """Row (axis 0) and column (axis 1) indices of an accumulator-shaped tile."""
        rows = self.cast(lax.broadcasted_iota(jnp.int32, shape, 0), self.acc)
        cols = self.cast(lax.broadcasted_iota(jnp.int32, shape, 1), self.acc)
        return rows, cols

    def matmul(self, a, b_ref, shape, *, transpose_b=False):
        """a @ b (or a @ b.T) in fp32: wgmma through a scoped accumulator.

        ``a`` is a shared-memory ref or a register array, ``b_ref`` a shared-memory ref. The
        GPU interpreter's wgmma takes neither register operands nor transposed views, so
        interpreted kernels compute the same product with a plain fp32-accumulating dot.
        """
        if self.interpret:
            a_val = a if isinstance(a, jax.Array) else a[...]
            dims = ((1,), (1 if transpose_b else 0,))
            return lax.dot_general(
                a_val, b_ref[...], (dims, ((), ())), preferred_element_type=jnp.float32
            )
        b = plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref

        def scope(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def _rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def smem_tile(shape, dtype):
    """A 2-D shared-memory tile swizzled for TMA and wgmma."""
    return plgpu.SMEM(shape, dtype, transforms=swizzle_transforms(dtype, shape[-1]))


def by_fullness(flags, block):
    """``block(masked)``, traced twice: full blocks (per the block map) skip the mask."""
    return lax.cond(common.is_full(flags), lambda: block(False), lambda: block(True))


def online_softmax_init(lay, rows: int, v: int):
    """(m, l, acc) of an empty online softmax over ``rows`` queries, in wgmma layouts."""
    return (
        lay.cast(jnp.full((rows,), -jnp.inf, jnp.float32), lay.row),
        lay.cast(jnp.zeros((rows,), jnp.float32), lay.row),
        lay.cast(jnp.zeros((rows, v), jnp.float32), lay.acc),
    )


def online_softmax_step(lay, s, v_smem, carry):
    """Folds masked scores s [rows, block] (-inf where hidden) and their values into carry."""
    m_prev, l_prev, acc = carry
    m_new = jnp.maximum(m_prev, s.max(axis=1))
    # Rows with nothing visible yet keep max -inf: shift by 0 so exp gives 0, not NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2((s - _rows(m_safe, s.shape)) * _LOG2E)
    alpha = jnp.exp2((m_prev - m_safe) * _LOG2E)
    l_new = alpha * l_prev + p.sum(axis=1)
    pv = lay.matmul(p.astype(v_smem.dtype), v_smem, acc.shape)
    return m_new, l_new, acc * _rows(alpha, acc.shape) + pv


def online_softmax_finish(carry):
    """Normalised output (zeros on rows with no visible key) and lse (-inf there), fp32."""
    m, l, acc = carry
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    return acc / _rows(l_safe, acc.shape), jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def _fwd_kernel(*refs, cfg, ms, lay):
    refs = list(refs)
    take = lambda k: [refs.pop(0) for _ in range(k)]
    q_ref, k_ref, v_ref = take(3)
    H, V = q_ref.shape[-1], v_ref.shape[-1]
    qs_ref, ks_ref = take(2) if cfg.has_segments else (None, None)
    off_ref, len_ref, idx_ref, cnt_ref, flg_ref, o_ref, lse_ref, q_smem = take(8)
    # The output tile reuses the query tile's shared memory when the shapes agree.
    o_smem = q_smem if H == V else refs.pop(0)
    lse_smem = refs.pop(0)
    qs_smem = refs.pop(0) if cfg.has_segments else None
    (q_bar,) = refs
    bq, bkv, G = cfg.block_q, cfg.block_kv, cfg.groups
    n, i, b = lax.axis_index("heads"), lax.axis_index("q"), lax.axis_index("batch")
    kvh = lax.div(n, jnp.int32(G))
    pos, cpos = common.map_pos(*ms), common.count_pos(*ms)
    q0 = i * bq

    plgpu.copy_gmem_to_smem(q_ref.at[b, n, pl.ds(q0, bq)], q_smem, q_bar.at[0])
    if qs_ref is not None:
        plgpu.copy_gmem_to_smem(qs_ref.at[b, pl.ds(q0, bq)], qs_smem, q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[0])

    s_shape = (bq, bkv)
    q_seg = None
    if qs_smem is not None:
        q_seg = _rows(lay.load(qs_smem, lay.row), s_shape)
    kv_len = len_ref[b]
    offset = off_ref[0]

    def block(step, k_smem, v_smem, ks_smem, carry, masked):
        kb = idx_ref[pos(b, kvh, i, step)]
        s_raw = lay.matmul(q_smem, k_smem, s_shape, transpose_b=True)
        s, _ = common.capped_logits(s_raw, cfg.scale, cfg.soft_cap)
        rows, cols = lay.iota(s_shape)
        k_seg = None
        if ks_smem is not None:
            k_seg = _cols(lay.load(ks_smem, lay.col), s_shape)
        vis = common.visible(
            cfg.mask,
            cfg.has_segments,
            flg_ref[pos(b, kvh, i, step)],
            offset + q0 + rows,
            kb * bkv + cols,
            kv_len,
            q_seg,
            k_seg,
            masked,
        )
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
        return online_softmax_step(lay, s, v_smem, carry)

    def body(indices, k_smem, v_smem, *rest):
        *seg, carry = rest
        ks_smem = seg[0] if seg else None
        step = indices[0]
        return by_fullness(
            flg_ref[pos(b, kvh, i, step)],
            lambda masked: block(step, k_smem, v_smem, ks_smem, carry, masked),
        )

    kv_block = lambda step: (idx_ref[pos(b, kvh, i, step)], 0)
    in_specs = [
        plgpu.BlockSpec((bkv, H), kv_block, transforms=swizzle_transforms(q_ref.dtype, H)),
        plgpu.BlockSpec((bkv, V), kv_block, transforms=swizzle_transforms(v_ref.dtype, V)),
    ]
    operands = [k_ref.at[b, kvh], v_ref.at[b, kvh]]
    if ks_ref is not None:
        in_specs.append(plgpu.BlockSpec((bkv,), lambda step: (idx_ref[pos(b, kvh, i, step)],)))
        operands.append(ks_ref.at[b])
    count = cnt_ref[cpos(b, kvh, i)]
    carry = plgpu.emit_pipeline(
        body,
        grid=(count,),
        in_specs=in_specs,
        max_concurrent_steps=cfg.max_concurrent_steps,
        init_carry=online_softmax_init(lay, bq, V),
    )(*operands)

    o, lse = online_softmax_finish(carry)
    o_smem[...] = o.astype(o_smem.dtype)
    lse_smem[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, n, pl.ds(q0, bq)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, n, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)


def forward(q_BNTH, k_BKSH, v_BKSV, q_seg_BT, kv_seg_BS, q_offset, kv_len_R, bmap, cfg, interpret):
    """Flash attention forward on padded head-major inputs.

    Returns:
      o_BNTV (q's dtype) and lse_BNT (float32, -inf on rows with no visible key).
    """
    B, N, Tp, H = q_BNTH.shape
    V = v_BKSV.shape[-1]
    bq = cfg.block_q
    dt = q_BNTH.dtype
    scratch = [smem_tile((bq, H), dt)]
    if H != V:
        scratch.append(smem_tile((bq, V), dt))
    scratch.append(plgpu.SMEM((bq,), jnp.float32))
    args = [q_BNTH, k_BKSH, v_BKSV]
    if cfg.has_segments:
        scratch.append(plgpu.SMEM((bq,), jnp.int32))
        args += [q_seg_BT, kv_seg_BS]
    scratch.append(plgpu.Barrier(num_arrivals=1 + cfg.has_segments, num_barriers=1))
    args += common.scalar_operands(q_offset, kv_len_R, bmap)
    kernel = plgpu.kernel(
        functools.partial(
            _fwd_kernel,
            cfg=cfg,
            ms=common.map_shape(bmap),
            lay=Layouts(interpret=bool(interpret)),
        ),
        out_type=[
            common.out_struct((B, N, Tp, V), dt, q_BNTH),
            common.out_struct((B, N, Tp), jnp.float32, q_BNTH),
        ],
        scratch_types=scratch,
        grid=(N, Tp // bq, B),
        grid_names=("heads", "q", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    return kernel(*args)
