"""Public entry point of the Mosaic GPU decode-attention kernel (NVIDIA Hopper and newer).

``decode_attention_gpu`` takes the arguments of ``api.decode_attention_tpu`` (splits instead
of block sizes) and runs ``gpu.decode_partials`` and ``gpu.combine``; ``unsupported_reason_gpu``
says when it cannot serve a call.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.decode_attention.api import (
    DecodeKernelBlockSizes,
    check_inputs,
    pack_rows,
    unpack_rows,
)

__all__ = ["GPU_HEAD_DIMS", "decode_attention_gpu", "gpu_block_kv", "unsupported_reason_gpu"]


GPU_HEAD_DIMS = (64, 128, 192, 256)


def gpu_block_kv(C: int, H: int, V: int) -> int | None:
    """Largest kv tile in (128, 64) that divides the cache (narrower for wide heads)."""
    for block in (128, 64) if max(H, V) <= 128 else (64,):
        if C % block == 0:
            return block
    return None


def unsupported_reason_gpu(q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, *, interpret=False, **kw):
    """Why the Mosaic GPU decode kernel cannot serve the call, or None when it can.

    The platform is not checked (the call may be lowered for CUDA elsewhere): without a GPU,
    pass ``interpret=True``.
    """
    B, T, N, H = q_BTNH.shape
    _, C, K, V = v_BCKV.shape
    if H not in GPU_HEAD_DIMS or V not in GPU_HEAD_DIMS:
        return f"head dims H={H}, V={V} not in {GPU_HEAD_DIMS} for the Mosaic GPU decode kernel"
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q_BTNH.dtype} is not bfloat16 or float16 (tensor-core operands)"
    if (N // K) * T > 64:
        return f"G * T = {(N // K) * T} query rows per kv head exceed one 64-row tile"
    if gpu_block_kv(C, H, V) is None:
        return f"cache length C={C} must be a multiple of 64 (no per-step padding copy)"
    return None


def decode_attention_gpu(
    q_BTNH,
    k_BCKH,
    v_BCKV,
    kv_lengths_B,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    q_offsets_B=None,
    window: int | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    interpret=False,
):
    """``decode_attention_tpu`` on NVIDIA Hopper (Pallas Mosaic GPU); same semantics and results.

    bfloat16/float16, head dims in ``GPU_HEAD_DIMS``, at most 64 query rows (G * T) per kv
    head, cache length a multiple of 64. ``num_splits`` (default: enough that B * K * splits
    covers 132 SMs, capped by the block count) cuts the kv axis. ``interpret``: True or an
    ``InterpretGPUParams`` runs it in the Mosaic GPU interpreter on CPU.
    """
    from pallas_kernels.decode_attention import gpu

    kv_lengths_B = jnp.asarray(kv_lengths_B)
    q_offsets_B = None if q_offsets_B is None else jnp.asarray(q_offsets_B)
    check_inputs(
        q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, DecodeKernelBlockSizes(), window, logits_soft_cap,
        q_offsets_B,
    )  # fmt: skip
    reason = unsupported_reason_gpu(q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, interpret=interpret)
    if reason is not None:
        raise NotImplementedError(f"pallas_kernels.decode_attention (GPU): {reason}")
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    B, T, N, H = q_BTNH.shape
    _, C, K, V = v_BCKV.shape
    G = N // K
    block_kv = gpu_block_kv(C, H, V)
    num_blocks = C // block_kv
    if num_splits is None:
        num_splits = -(-132 // (B * K))
    num_splits = max(1, min(int(num_splits), num_blocks))
    q_BKRH = jnp.pad(pack_rows(q_BTNH, K), ((0, 0), (0, 0), (0, gpu.ROWS - G * T), (0, 0)))
    o_BKSRV, lse_BKSR = gpu.decode_partials(
        q_BKRH,
        k_BCKH,
        v_BCKV,
        kv_lengths_B,
        q_offsets_B,
        T=T,
        block_kv=block_kv,
        num_splits=num_splits,
        scale=H**-0.5 if scale is None else float(scale),
        soft_cap=logits_soft_cap,
        window=window,
        interpret=interpret,
    )
    return unpack_rows(*gpu.combine(o_BKSRV, lse_BKSR), q_BTNH, return_lse)
