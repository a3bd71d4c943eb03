"""Public entry point of the TPU decode-attention kernel: checks, block sizes, layout.

``decode_attention_tpu`` packs the queries of each kv head into rows, runs the split Pallas
kernel (``tpu.decode_partials``) and merges the splits (``tpu.combine_splits``). Inference
only: there is no backward (``jaxattn.dot_product_attention(implementation=
"pallas_tpu_decode")`` adds one through its reference). It is jit-able with traced
``kv_lengths`` and ``q_offsets``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["DecodeKernelBlockSizes", "decode_attention_tpu", "unsupported_reason"]

SUPPORTED_HEAD_DIMS = (64, 128, 192, 256, 512, 576)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeKernelBlockSizes:
    """Tunables of the decode kernels (``jaxattn.ops.DecodeBlockSizes`` tunes the op's XLA
    "decode" implementation instead).

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
        for name in ("block_kv", "min_parallel", "num_splits"):
            value = getattr(self, name)
            if name == "num_splits" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"DecodeKernelBlockSizes.{name} must be a positive int"
                    f"{' or None' if name == 'num_splits' else ''}, got {value!r}"
                )

    def resolve(self, B: int, K: int, C: int) -> tuple[int, int]:
        """Effective (block_kv, num_splits) for a cache of length C."""
        block_kv = C if self.block_kv >= C else self.block_kv
        num_blocks = -(-C // block_kv)
        splits = self.num_splits
        if splits is None:
            splits = -(-self.min_parallel // (B * K))
        return block_kv, max(1, min(splits, num_blocks))


def pack_rows(q_BTNH, K: int):
    """q [B, T, N, H] -> [B, K, G*T, H]: the queries of kv head k as rows ordered (g, t)."""
    B, T, N, H = q_BTNH.shape
    return q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, H)


def unpack_rows(o_BKRV, lse_BKR, q_BTNH, return_lse):
    """The inverse of ``pack_rows`` on the outputs (rows past G*T are padding, dropped)."""
    B, T, N, _ = q_BTNH.shape
    K, V = o_BKRV.shape[1], o_BKRV.shape[-1]
    R = N // K * T
    o_BKRV = o_BKRV[:, :, :R].reshape(B, K, N // K, T, V)
    o_BTNV = o_BKRV.transpose(0, 3, 1, 2, 4).reshape(B, T, N, V).astype(q_BTNH.dtype)
    if not return_lse:
        return o_BTNV
    return o_BTNV, lse_BKR[:, :, :R].reshape(B, N, T)  # rows (g, t) of head k: n = k * G + g


def check_inputs(
    q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, block_sizes, window, logits_soft_cap, q_offsets_B=None
):
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
    if q_offsets_B is not None and (
        jnp.shape(q_offsets_B) != (B,) or not jnp.issubdtype(q_offsets_B.dtype, jnp.integer)
    ):
        raise ValueError(
            f"q_offsets must be int [B]={(B,)}, got {jnp.shape(q_offsets_B)} {q_offsets_B.dtype}"
        )
    block_kv, _ = block_sizes.resolve(B, K, C)
    if block_kv != C and block_kv % 8:
        raise ValueError(
            f"DecodeKernelBlockSizes.block_kv={block_kv} must be a multiple of 8 when smaller "
            f"than the cache C={C}"
        )
    if window is not None and (isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be >= 1 or None, got {window!r}")
    if logits_soft_cap is not None and logits_soft_cap <= 0:
        raise ValueError(f"logits_soft_cap must be > 0 or None, got {logits_soft_cap!r}")


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


def decode_attention_tpu(
    q_BTNH,
    k_BCKH,
    v_BCKV,
    kv_lengths_B,
    *,
    q_offsets_B=None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    window: int | None = None,
    block_sizes: DecodeKernelBlockSizes | None = None,
    return_lse: bool = False,
    interpret=False,
):
    """Attention of T queries per sequence over a ragged KV cache (flash-decoding on TPU).

    Query t of sequence b sits at position ``p = q_offsets[b] + t`` (default ``q_offsets =
    kv_lengths - T``); key j is visible when ``j <= p``, ``j < kv_lengths[b]`` and, with
    ``window=W``, ``p - j < W``. A row with no visible key gives zeros and lse = -inf, never
    NaN.

    Args:
      q_BTNH: queries [B, T, N, H] (float32 or bfloat16).
      k_BCKH: key cache [B, C, K, H], same dtype, N % K == 0 (GQA; heads are not repeated).
      v_BCKV: value cache [B, C, K, V]; V may differ from H (MLA: H = 576, V = 512).
        Passing the very same array as ``k_BCKH`` reads the cache once (absorbed MLA, where
        the latent cache is both key and value: slice ``o[..., :512]`` afterwards).
      kv_lengths_B: int [B], 0 <= kv_lengths <= C; may be traced. (Larger values see only
        the C cached keys, as in the reference: no block past the cache is ever read.)
      q_offsets_B: int [B] position of query 0 of each sequence, or None; may be traced.
      scale: multiplies q.k; default 1/sqrt(H).
      logits_soft_cap: c in c * tanh(s / c), or None.
      window: sliding window W (p - j < W), or None.
      block_sizes: ``DecodeKernelBlockSizes``; default ``DecodeKernelBlockSizes()``.
      return_lse: also return lse_BNT.
      interpret: False on TPU; True or a ``pltpu.InterpretParams`` for the TPU interpreter.

    Returns:
      o_BTNV in q's dtype, and lse_BNT (float32) when ``return_lse``.

    Raises:
      ValueError: malformed shapes, dtypes or options.
      NotImplementedError: ``unsupported_reason`` is not None.
    """
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.decode_attention import tpu

    block_sizes = DecodeKernelBlockSizes() if block_sizes is None else block_sizes
    kv_lengths_B = jnp.asarray(kv_lengths_B)
    q_offsets_B = None if q_offsets_B is None else jnp.asarray(q_offsets_B)
    check_inputs(
        q_BTNH, k_BCKH, v_BCKV, kv_lengths_B, block_sizes, window, logits_soft_cap, q_offsets_B
    )
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
    q_BKRH = pack_rows(q_BTNH, K)
    acc, m, l = tpu.decode_partials(
        q_BKRH,
        k_BCKH,
        v_BCKV,
        kv_lengths_B,
        q_offsets_B,
        T=T,
        block_kv=block_kv,
        num_splits=num_splits,
        scale=scale,
        soft_cap=logits_soft_cap,
        window=window,
        shared_kv=v_BCKV is k_BCKH,
        interpret=interpret,
    )
    return unpack_rows(*tpu.combine_splits(acc, m, l), q_BTNH, return_lse)
