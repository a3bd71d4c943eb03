"""Flash-decoding on NVIDIA Hopper (Pallas Mosaic GPU): a few queries over a long KV cache.

Same semantics and packing as tpu.py: the G x T queries of one kv head are the rows of one
[Rp, H] tile (rows ordered (g, t), padded to the 64-row wgmma tile), the cache stays
[B, C, K, H] and is viewed (free reshape) as [B, C, K*H] so a kv block of head k is the 2-D
tile (block_kv, H) at column block k, fetched by TMA. The grid is (K, num_splits, B): the kv
axis is cut into contiguous splits (flash-decoding) so that one sequence keeps every SM busy.
Each CTA walks only the live blocks of its split (a dynamic ``emit_pipeline`` trip count from
kv_lengths and the window: dead capacity is never read), keeps an fp32 online softmax in
registers, and writes its normalised partial output and log-sum-exp; ``combine`` merges the
splits. Inference only (no backward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_attention.blocks import live_blocks
from pallas_kernels.flash_attention.common import capped_logits, out_struct
from pallas_kernels.flash_attention.gpu import (
    Layouts,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_step,
    smem_tile,
    swizzle_transforms,
)

ROWS = 64  # query rows per CTA: one wgmma M tile


def _kernel(
    q_ref, k_ref, v_ref, len_ref, off_ref, o_ref, lse_ref, q_smem, o_smem, lse_smem, bar,
    *, T, C, block_kv, blocks_per_split, scale, soft_cap, window, lay,
):  # fmt: skip
    kvh, s, b = lax.axis_index("heads"), lax.axis_index("split"), lax.axis_index("batch")
    Rp, H = q_smem.shape
    V = o_smem.shape[-1]
    kv_len, q0 = len_ref[b], off_ref[b]  # query t sits at position q0 + t
    n_keys = jnp.minimum(kv_len, C)
    lo, count = live_blocks(kv_len, T=T, block_kv=block_kv, window=window, cache_len=C, q_start=q0)
    first = jnp.maximum(lo, s * blocks_per_split)
    last = jnp.minimum(lo + count, (s + 1) * blocks_per_split)  # exclusive
    steps = jnp.maximum(last - first, 0)

    plgpu.copy_gmem_to_smem(q_ref.at[b, kvh], q_smem, bar.at[0])
    plgpu.barrier_wait(bar.at[0])

    s_shape = (Rp, block_kv)

    def body(indices, k_smem, v_smem, carry):
        start = (first + indices[0]) * block_kv
        sc, _ = capped_logits(
            lay.matmul(q_smem, k_smem, s_shape, transpose_b=True), scale, soft_cap
        )
        rows, cols = lay.iota(s_shape)
        k_pos = start + cols
        q_pos = q0 + (lax.rem(rows, jnp.int32(T)) if T > 1 else 0)
        vis = (k_pos <= q_pos) & (k_pos < n_keys)
        if window is not None:
            vis = vis & (q_pos - k_pos < window)
        return online_softmax_step(lay, jnp.where(vis, sc, -jnp.inf), v_smem, carry)

    at = lambda step: (first + step, kvh)
    carry = plgpu.emit_pipeline(
        body,
        grid=(steps,),
        in_specs=[
            plgpu.BlockSpec((block_kv, H), at, transforms=swizzle_transforms(k_ref.dtype, H)),
            plgpu.BlockSpec((block_kv, V), at, transforms=swizzle_transforms(v_ref.dtype, V)),
        ],
        max_concurrent_steps=2,
        init_carry=online_softmax_init(lay, Rp, V),
    )(k_ref.at[b], v_ref.at[b])

    o, lse = online_softmax_finish(carry)
    o_smem[...] = o.astype(o_smem.dtype)
    lse_smem[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, kvh, s])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, kvh, s])
    plgpu.wait_smem_to_gmem(0)


def decode_partials(
    q_BKRH, k_BCKH, v_BCKV, kv_lengths_B, q_offsets_B=None, *, T, block_kv, num_splits, scale,
    soft_cap, window, interpret,
):  # fmt: skip
    """Per-split normalised outputs o [B, K, splits, Rp, V] (fp32 where shared memory allows)
    and lse [B, K, splits, Rp] (fp32)."""
    B, K, Rp, H = q_BKRH.shape
    _, C, _, V = v_BCKV.shape
    num_blocks = C // block_kv
    blocks_per_split = -(-num_blocks // num_splits)
    # Partials in fp32 when the shared-memory budget allows (q tile, a 2-deep k/v ring and
    # the output tile); otherwise (H = V = 256) in q's dtype.
    itemsize = q_BKRH.dtype.itemsize
    ring = 2 * block_kv * (H + V) * itemsize
    o_dtype = jnp.float32 if Rp * H * itemsize + ring + Rp * V * 4 <= 220 * 1024 else q_BKRH.dtype
    kernel = plgpu.kernel(
        functools.partial(
            _kernel,
            T=T,
            C=C,
            block_kv=block_kv,
            blocks_per_split=blocks_per_split,
            scale=scale,
            soft_cap=soft_cap,
            window=window,
            lay=Layouts(bool(interpret)),
        ),
        out_type=[
            out_struct((B, K, num_splits, Rp, V), o_dtype, q_BKRH),
            out_struct((B, K, num_splits, Rp), jnp.float32, q_BKRH),
        ],
        scratch_types=[
            smem_tile((Rp, H), q_BKRH.dtype),
            smem_tile((Rp, V), o_dtype),
            plgpu.SMEM((Rp,), jnp.float32),
            plgpu.Barrier(num_arrivals=1, num_barriers=1),
        ],
        grid=(K, num_splits, B),
        grid_names=("heads", "split", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    k_BCX = k_BCKH.reshape(B, C, K * H)
    v_BCX = v_BCKV.reshape(B, C, K * V)
    lens = jnp.asarray(kv_lengths_B, jnp.int32)
    offs = lens - T if q_offsets_B is None else jnp.asarray(q_offsets_B, jnp.int32)
    return kernel(q_BKRH, k_BCX, v_BCX, lens, offs)


def combine(o_BKSRV, lse_BKSR):
    """Merge the splits: o_BKRV (fp32, zero on rows with no visible key) and lse_BKR."""
    lse_BKR = jax.nn.logsumexp(lse_BKSR, axis=2)
    finite = jnp.isfinite(lse_BKR)
    w_BKSR = jnp.where(finite[:, :, None], jnp.exp(lse_BKSR - lse_BKR[:, :, None]), 0.0)
    o_BKRV = jnp.sum(w_BKSR[..., None] * o_BKSRV.astype(jnp.float32), axis=2)
    return o_BKRV, jnp.where(finite, lse_BKR, -jnp.inf)
