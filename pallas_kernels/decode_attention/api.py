"""Public entry point of the TPU decode-attention kernel: checks, block sizes, layout.

``decode_attention`` packs the queries of each kv head into rows, runs the split Pallas
kernel (``tpu.decode_partials``) and merges the splits (``tpu.combine_splits``). Inference
only: there is no backward. It is jit-able with traced ``kv_lengths``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import tpu

__all__ = [
    "DecodeBlockSizes",
    "decode_attention",
    "decode_attention_gpu",
    "unsupported_reason",
    "unsupported_reason_gpu",
]

SUPPORTED_HEAD_DIMS = (64, 128, 192, 256, 512, 576)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeBlockSizes:
    """Tunables of the decode kernel.

    Attributes:
      block_kv: cache rows per block; used as is when it is < C (then a multiple of 8;
        a multiple of 128 keeps the score tile lane-dense), else the whole cache.
      num_splits: kv splits (flash-decoding). None picks enough splits that
        B * K * num_splits covers ``min_parallel`` work items, capped by the block count.
      min_parallel: parallel work items aimed for when ``num_splits`` is None.
    """

    block_kv: int = 512
    num_splits: int | None = None
    min_parallel: int = 8

    def __post_init__(self):
        if self.block_kv < 1:
            raise ValueError(f"{self.block_kv=} must be >= 1")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be >= 1 or None")

    def resolve(self, B: int, K: int, C: int) -> tuple[int, int]:
        """Effective (block_kv, num_splits) for a cache of length C."""
        block_kv = C if self.block_kv >= C else self.block_kv
        num_blocks = -(-C // block_kv)
        splits = self.num_splits
        if splits is None:
            splits = -(-self.min_parallel // (B * K))
        return block_kv, max(1, min(splits, num_blocks))


def _pack_rows(q_BTNH, K: int):
    """q [B, T, N, H] -> [B, K, G*T, H]: the queries of kv head k as rows ordered (g, t)."""
    B, T, N, H = q_BTNH.shape
    return q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, H)


def _unpack_rows(o_BKRV, lse_BKR, q_BTNH, return_lse):
    """The inverse of ``_pack_rows`` on the outputs (rows past G*T are padding, dropped)."""
    B, T, N, _ = q_BTNH.shape
    K, V = o_BKRV.shape[1], o_BKRV.shape[-1]
    R = N // K * T
    o_BKRV = o_BKRV[:, :, :R].reshape(B, K, N // K, T, V)
    o_BTNV = o_BKRV.transpose(0, 3, 1, 2, 4).reshape(B, T, N, V).astype(q_BTNH.dtype)
    if not return_lse:
        return o_BTNV
    return o_BTNV, lse_BKR[:, :, :R].reshape(B, N, T)  # rows (g, t) of head k: n = k * G + g


def _check(q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, block_sizes, window, logits_soft_cap):
    """Raise ValueError on malformed input, before any tracing work."""
    shapes = (
        f"q {q_BTNH.shape}, k {k_BCKH.shape}, v {v_BCKV.shape}, kv_lengths {kv_lengths_B.shape}"
    )
    if q_BTNH.ndim != 4 or k_BCKH.ndim != 4 or v_BCKV.ndim != 4 or kv_lengths_B.ndim != 1:
        raise ValueError(f"want q [B,T,N,H], k [B,C,K,H], v [B,C,K,V], kv_lengths [B]: {shapes}")
    B, T, N, H = q_BTNH.shape
    Bk, C, K, Hk = k_BCKH.shape
    if (Bk, C, K) != v_BCKV.shape[:3] or Bk != B or kv_lengths_B.shape[0] != B or Hk != H:
        raise ValueError(f"batch, cache length, kv heads or head dim disagree: {shapes}")
    if N % K:
        raise ValueError(f"query heads {N=} must be a multiple of kv heads {K=}: {shapes}")
    if not (q_BTNH.dtype == k_BCKH.dtype == v_BCKV.dtype):
        raise ValueError(
            f"q, k, v must share a dtype, got {q_BTNH.dtype}, {k_BCKH.dtype}, {v_BCKV.dtype}"
        )
    if not jnp.issubdtype(kv_lengths_B.dtype, jnp.integer):
        raise ValueError(f"kv_lengths must be integer, got {kv_lengths_B.dtype}")
    block_kv, _ = block_sizes.resolve(B, K, C)
    if block_kv != C and block_kv % 8:
        raise ValueError(f"{block_kv=} must be a multiple of 8 when smaller than the cache {C=}")
    if window is not None and window < 1:
        raise ValueError(f"{window=} must be >= 1 or None")
    if logits_soft_cap is not None and logits_soft_cap <= 0:
        raise ValueError(f"{logits_soft_cap=} must be > 0 or None")


def unsupported_reason(q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, *, interpret=False, **kw):
    """Why this kernel cannot serve the call on this platform, or None when it can.

    Args: as ``decode_attention`` (only shapes, dtypes and ``interpret`` matter).
    """
    H, V = q_BTNH.shape[-1], v_BCKV.shape[-1]
    if H not in SUPPORTED_HEAD_DIMS or V not in SUPPORTED_HEAD_DIMS:
        return f"head dims H={H}, V={V} not in the tested set {SUPPORTED_HEAD_DIMS}"
    if q_BTNH.dtype not in (jnp.float32, jnp.bfloat16):
        return f"dtype {q_BTNH.dtype} is not float32 or bfloat16"
    if not interpret and jax.default_backend() != "tpu":
        return (
            f"the Mosaic TPU kernel needs a TPU (backend is {jax.default_backend()!r}); "
            "pass interpret=True to run it in the TPU interpreter"
        )
    return None


def decode_attention(
    q_BTNH,
    k_BCKH,
    v_BCKV,
    kv_lengths_B,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    window: int | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    return_lse: bool = False,
    interpret=False,
):
    """Attention of T queries per sequence over a ragged KV cache (flash-decoding on TPU).

    Query t of sequence b sits at position ``p = kv_lengths[b] - T + t``; key j is visible when
    ``j <= p``, ``j < kv_lengths[b]`` and, with ``window=W``, ``p - j < W``. A row with no
    visible key gives zeros and lse = -inf, never NaN.

    Args:
      q_BTNH: queries [B, T, N, H] (float32 or bfloat16).
      k_BCKH: key cache [B, C, K, H], same dtype, N % K == 0 (GQA; heads are not repeated).
      v_BCKV: value cache [B, C, K, V]; V may differ from H (MLA: H = 576, V = 512).
        Passing the very same array as ``k_BCKH`` reads the cache once (absorbed MLA, where
        the latent cache is both key and value: slice ``o[..., :512]`` afterwards).
      kv_lengths_B: int [B], 0 <= kv_lengths <= C; may be traced. (Larger values see only
        the C cached keys, as in the reference: no block past the cache is ever read.)
      scale: multiplies q.k; default 1/sqrt(H).
      logits_soft_cap: c in c * tanh(s / c), or None.
      window: sliding window W (p - j < W), or None.
      block_sizes: ``DecodeBlockSizes``; default ``DecodeBlockSizes()``.
      return_lse: also return lse_BNT.
      interpret: False on TPU; True or a ``pltpu.InterpretParams`` for the TPU interpreter.

    Returns:
      o_BTNV in q's dtype, and lse_BNT (float32) when ``return_lse``.

    Raises:
      ValueError: malformed shapes, dtypes or options.
      NotImplementedError: ``unsupported_reason`` is not None.
    """
    block_sizes = DecodeBlockSizes() if block_sizes is None else block_sizes
    kv_lengths_B = jnp.asarray(kv_lengths_B)
    _check(q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, block_sizes, window, logits_soft_cap)
    reason = unsupported_reason(q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, interpret=interpret)
    if reason is not None:
        raise NotImplementedError(f"pallas_kernels.decode_attention: {reason}")
    if interpret is True:
        interpret = pltpu.InterpretParams()
    B, T, N, H = q_BTNH.shape
    _, C, K, V = v_BCKV.shape
    block_kv, num_splits = block_sizes.resolve(B, K, C)
    scale = H**-0.5 if scale is None else float(scale)
    # Rows (g, t) of one kv head form the matmul's M dimension: [B, K, G*T, H].
    q_BKRH = _pack_rows(q_BTNH, K)
    acc, m, l = tpu.decode_partials(
        q_BKRH,
        k_BCKH,
        v_BCKV,
        kv_lengths_B,
        T=T,
        block_kv=block_kv,
        num_splits=num_splits,
        scale=scale,
        soft_cap=logits_soft_cap,
        window=window,
        shared_kv=v_BCKV is k_BCKH,
        interpret=interpret,
    )
    return _unpack_rows(*tpu.combine_splits(acc, m, l), q_BTNH, return_lse)


# ------------------------------------------------------------------------------ GPU

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
    window: int | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    interpret=False,
):
    """``decode_attention`` on NVIDIA Hopper (Pallas Mosaic GPU); same semantics and results.

    bfloat16/float16, head dims in ``GPU_HEAD_DIMS``, at most 64 query rows (G * T) per kv
    head, cache length a multiple of 64. ``num_splits`` (default: enough that B * K * splits
    covers 132 SMs, capped by the block count) cuts the kv axis. ``interpret``: True or an
    ``InterpretGPUParams`` runs it in the Mosaic GPU interpreter on CPU.
    """
    from pallas_kernels.decode_attention import gpu

    kv_lengths_B = jnp.asarray(kv_lengths_B)
    _check(q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, DecodeBlockSizes(), window, logits_soft_cap)
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
    q_BKRH = jnp.pad(_pack_rows(q_BTNH, K), ((0, 0), (0, 0), (0, gpu.ROWS - G * T), (0, 0)))
    o_BKSRV, lse_BKSR = gpu.decode_partials(
        q_BKRH,
        k_BCKH,
        v_BCKV,
        kv_lengths_B,
        T=T,
        block_kv=block_kv,
        num_splits=num_splits,
        scale=H**-0.5 if scale is None else float(scale),
        soft_cap=logits_soft_cap,
        window=window,
        interpret=interpret,
    )
    return _unpack_rows(*gpu.combine(o_BKSRV, lse_BKSR), q_BTNH, return_lse)
