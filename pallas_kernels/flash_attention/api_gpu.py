"""Public entry point of the Pallas Mosaic GPU flash attention (NVIDIA Hopper and newer).

``flash_attention_gpu`` takes the arguments of ``api.flash_attention`` and runs the Mosaic
GPU kernels (gpu.py, gpu_bwd.py) through the same custom VJP and visit tables;
``unsupported_reason_gpu`` says in one sentence when they cannot serve a call.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.flash_attention.api import (
    BlockSizes,
    _check_inputs,
    _effective_blocks,
    adapted_block_sizes,
    check_visits,
    launch,
    unsupported_reason,
    visits_tuple,
)

__all__ = ["flash_attention_gpu", "gpu_block_sizes", "unsupported_reason_gpu"]


_GPU_DTYPES = (jnp.bfloat16, jnp.float16)
_GPU_UNIT = 64  # wgmma works on 64-row warpgroup tiles; 128-byte swizzles on 64 bf16 lanes


def gpu_block_sizes(head_dim: int = 128) -> BlockSizes:
    """Starting tile sizes for the Mosaic GPU kernels (one warpgroup per CTA, Hopper).

    64 query rows per CTA keep the fp32 score tile and the output accumulator in registers;
    wide heads (> 128) halve the kv tile. Not yet tuned on hardware.
    """
    bkv = 128 if head_dim <= 128 else 64
    return BlockSizes(block_q=64, block_kv=bkv, block_q_bwd=64, block_kv_bwd=64)


def unsupported_reason_gpu(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    mask=None,
    segment_ids=None,
    q_offset=0,
    kv_lengths=None,
    logits_soft_cap=None,
    block_sizes=None,
    block_visits=None,
) -> str | None:
    """None if the Mosaic GPU kernels can serve the call, else a sentence saying why not."""
    if q_BTNH.dtype not in _GPU_DTYPES:
        return (
            "the Mosaic GPU flash attention runs on bfloat16/float16 tensor cores, not "
            f"{q_BTNH.dtype}; cast the inputs or use implementation='cudnn'/'chunked'"
        )
    for name, x in (("q", q_BTNH), ("k", k_BSKH), ("v", v_BSKV)):
        dim = x.shape[-1]
        if dim > 256:
            return f"the Mosaic GPU flash attention supports head dims up to 256, {name} has {dim}"
    if block_sizes is not None:
        for f in dataclasses.fields(block_sizes):
            if getattr(block_sizes, f.name) % _GPU_UNIT:
                return f"BlockSizes.{f.name} must be a multiple of {_GPU_UNIT} on GPU"
    visits = visits_tuple(block_visits)
    bs = block_sizes or adapted_block_sizes(gpu_block_sizes(q_BTNH.shape[-1]), visits, _GPU_UNIT)
    reason = unsupported_reason(
        q_BTNH,
        k_BSKH,
        v_BSKV,
        mask=mask,
        segment_ids=segment_ids,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        logits_soft_cap=logits_soft_cap,
        block_sizes=_gpu_blocks_as_sizes(bs, q_BTNH.shape[1], k_BSKH.shape[1]),
        block_visits=visits,
    )
    return None if reason is None else reason.replace("Pallas TPU", "Mosaic GPU")


def _gpu_blocks_as_sizes(bs: BlockSizes, T: int, S: int) -> BlockSizes:
    bq, bkv, bq_b, bkv_b = _effective_blocks(bs, T, S, _GPU_UNIT)
    return BlockSizes(block_q=bq, block_kv=bkv, block_q_bwd=bq_b, block_kv_bwd=bkv_b)


def _pad_last(x, multiple: int):
    pad = -x.shape[-1] % multiple
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def flash_attention_gpu(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    mask=None,
    segment_ids=None,
    q_offset=0,
    kv_lengths=None,
    scale=None,
    logits_soft_cap=None,
    block_sizes=None,
    block_visits=None,
    return_lse=False,
    interpret=False,
):
    """Flash attention on NVIDIA Hopper (Pallas Mosaic GPU), differentiable in q, k and v.

    Same arguments and results as ``flash_attention``; bfloat16/float16 inputs, head dims up
    to 256 (dims that are not multiples of 64 are zero-padded, which leaves q . k and the
    sliced output unchanged), blocks multiples of 64 (default ``gpu_block_sizes``).
    ``interpret``: False on a GPU, or True / an ``InterpretGPUParams`` to run the kernels in
    the Mosaic GPU interpreter on CPU (matmuls there are plain dots: the interpreter's wgmma
    takes neither register operands nor transposed shared-memory views).
    """
    q_offset = 0 if q_offset is None else q_offset
    _check_inputs(q_BTNH, k_BSKH, v_BSKV, segment_ids, q_offset, kv_lengths, scale, logits_soft_cap)
    visits = check_visits(block_visits, q_BTNH, k_BSKH)
    reason = unsupported_reason_gpu(
        q_BTNH, k_BSKH, v_BSKV, mask=mask, q_offset=q_offset, block_sizes=block_sizes,
        block_visits=visits,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(reason)
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    H, V = q_BTNH.shape[-1], v_BSKV.shape[-1]
    bs = block_sizes or adapted_block_sizes(gpu_block_sizes(H), visits, _GPU_UNIT)
    blocks = _effective_blocks(bs, T, S, _GPU_UNIT)
    scale = H**-0.5 if scale is None else scale  # of the real head dim, not the padded one
    q, k, v = (_pad_last(x, _GPU_UNIT) for x in (q_BTNH, k_BSKH, v_BSKV))
    out = launch(
        "gpu", q, k, v, blocks, mask, segment_ids, q_offset, kv_lengths, scale, logits_soft_cap,
        return_lse, interpret, visits,
    )  # fmt: skip
    if return_lse:
        return out[0][..., :V], out[1]
    return out[..., :V]
