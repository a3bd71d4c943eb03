"""``jaxattn.dot_product_attention``: one attention op, several implementations.

Implementations, chosen by name or by ``"auto"``:

* ``"xla"``: the readable reference; materialises the [B, K, G, T, S] scores.
* ``"chunked"``: memory-efficient pure XLA (online softmax over kv blocks, custom VJP,
  O(T·block) memory, masked blocks skipped).
* ``"decode"``: a few queries over a long kv axis (decoding): one loop over large kv blocks,
  no padding copies, unused cache capacity skipped.
* ``"pallas_tpu"`` / ``"pallas_gpu"``: Pallas kernels from ``pallas_kernels.flash_attention``.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on NVIDIA GPUs.

``"auto"`` takes the platform's kernel when it can serve the call and otherwise falls back
to ``"decode"`` for a few queries per sequence (T <= DecodeBlockSizes.max_q) over more than
one kv block and ``"chunked"`` for the rest, logging the kernel fallback once. A name
asked for explicitly that cannot serve the call raises NotImplementedError saying why.
"""

from __future__ import annotations

import logging

import jax

from jaxattn.ops._attention_args import AttentionArgs, check_args
from jaxattn.ops.attention_chunked import ChunkedBlockSizes, chunked_attention
from jaxattn.ops.attention_decode import DecodeBlockSizes, decode_attention
from jaxattn.ops.attention_xla import xla_attention

__all__ = ["IMPLEMENTATIONS", "dot_product_attention"]

_KERNEL_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}  # Pallas kernels and their backends
IMPLEMENTATIONS = ("auto", "xla", "chunked", "decode", "pallas_tpu", "pallas_gpu", "cudnn")

_log = logging.getLogger("jaxattn")
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        _log.warning(msg)


def dot_product_attention(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    mask=None,
    scale=None,
    logits_soft_cap=None,
    segment_ids=None,
    q_offset=None,
    kv_lengths=None,
    implementation="auto",
    return_lse=False,
    block_sizes=None,
):
    """Scaled dot-product attention with GQA/MQA, declarative masks and several backends.

    o[b, t, n] = Σ_s softmax_s(cap(scale · q[b, t, n] · k[b, s, n // G])) · v[b, s, n // G]
    over the keys s that the mask, segment ids and kv_lengths leave visible.

    Args:
      q_BTNH: queries [B, T, N, H].
      k_BSKH: keys [B, S, K, H]; N % K == 0 (G = N // K query heads share a kv head).
      v_BSKV: values [B, S, K, V]; V may differ from H (MLA: H = 192, V = 128).
      mask: a ``jaxattn.masks`` spec, or a dense bool array [T, S], [B, T, S] or [B, N, T, S]
        (True = attend), or None.
      scale: logit scale, default 1/sqrt(H).
      logits_soft_cap: if set, logits become cap · tanh(logits / cap) (after scaling).
      segment_ids: one int array [B, T] (needs T == S) or a pair (q [B, T], kv [B, S]);
        queries attend only to keys of the same segment.
      q_offset: position of query row 0 on the kv axis: an int, or an int array [] or [B].
      kv_lengths: int [B]; keys at positions >= kv_lengths[b] are masked.
      implementation: one of IMPLEMENTATIONS.
      return_lse: also return the log-sum-exp of the visible logits, lse_BNT (float32).
      block_sizes: tuning for "chunked" (ChunkedBlockSizes), "decode" (DecodeBlockSizes) or
        the Pallas kernels.

    Returns:
      o_BTNV in q's dtype, and lse_BNT if ``return_lse``. A query row that sees no key gives
      zeros (lse = -inf) and zero gradients.

    Raises:
      ValueError: bad input (names the argument and the shapes involved).
      NotImplementedError: a named implementation that cannot serve this call.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    a = check_args(
        q_BTNH,
        k_BSKH,
        v_BSKV,
        mask=mask,
        scale=scale,
        logits_soft_cap=logits_soft_cap,
        segment_ids=segment_ids,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
    )
    if implementation == "auto":
        implementation = _choose(a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)
    if implementation == "xla":
        return xla_attention(a, q_BTNH, k_BSKH, v_BSKV, return_lse)
    if implementation == "chunked":
        if block_sizes is not None and not isinstance(block_sizes, ChunkedBlockSizes):
            raise ValueError(
                f"block_sizes for 'chunked' must be ChunkedBlockSizes, "
                f"got {type(block_sizes).__name__}"
            )
        return chunked_attention(a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)
    if implementation == "decode":
        if block_sizes is not None and not isinstance(block_sizes, DecodeBlockSizes):
            raise ValueError(
                f"block_sizes for 'decode' must be DecodeBlockSizes, "
                f"got {type(block_sizes).__name__}"
            )
        return decode_attention(a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)
    if implementation == "cudnn":
        reason = _cudnn_unsupported(a, q_BTNH, return_lse)
        if reason:
            raise NotImplementedError(f"implementation='cudnn' cannot serve this call: {reason}")
        return _cudnn(a, q_BTNH, k_BSKH, v_BSKV)
    reason = _pallas_unsupported(implementation, a, q_BTNH, k_BSKH, v_BSKV, block_sizes)
    if reason:
        raise NotImplementedError(
            f"implementation={implementation!r} cannot serve this call: {reason}"
        )
    return _pallas(implementation, a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)


def _choose(a: AttentionArgs, q, k, v, return_lse, block_sizes) -> str:
    backend = jax.default_backend()
    preferred = {p: impl for impl, p in _KERNEL_PLATFORM.items()}.get(backend)
    decode_bs = block_sizes if isinstance(block_sizes, DecodeBlockSizes) else DecodeBlockSizes()
    if backend == "gpu" and a.T <= decode_bs.max_q:
        preferred = None  # the GPU kernel tiles 64 query rows: decoding would waste most of them
    if preferred is not None:
        kernel_blocks = None if isinstance(block_sizes, ChunkedBlockSizes) else block_sizes
        reason = _pallas_unsupported(preferred, a, q, k, v, kernel_blocks)
        if reason is None:
            return preferred
        _log_once(f"jaxattn: {preferred} cannot serve a call ({reason}); using a pure-XLA one")
    bs = (
        block_sizes
        if isinstance(block_sizes, ChunkedBlockSizes)
        else ChunkedBlockSizes.for_backend(backend)
    )
    if a.T <= bs.block_q and a.S <= bs.block_kv:
        # one block: "chunked" builds no loop, table or cond and works in a head-major layout,
        # beating the autodiffed reference. Median ms fwd / fwd+bwd, fp32, 2 CPU cores, the
        # training's CPU flags: B 16 T 128 N 4 H 48 V 32 causal (the training shape) xla
        # 7.1 / 19.3, chunked 5.1 / 14.4; B 8 T 256 N 8 K 2 H 64 causal xla 54.3 / 100.1,
        # chunked 31.4 / 63.9; B 16 T 64 N 8 H 64 kv_lengths xla 4.0 / 10.1, chunked 3.1 / 8.7
        return "chunked"
    if a.T <= decode_bs.max_q and not isinstance(block_sizes, ChunkedBlockSizes):
        return "decode"  # few queries: one pass over large kv blocks, no query tiling
    return "chunked"


def _kernel_module(implementation: str):
    try:
        from pallas_kernels.flash_attention import api
    except ImportError as e:  # the kernel package is optional in this build
        return None, f"pallas_kernels.flash_attention is not importable ({e})"
    return api, None


def _interpret_params(platform: str):
    """The interpret params of an active ``pltpu.force_tpu_interpret_mode()`` (platform "tpu")
    or ``force_gpu_interpret_mode()`` (platform "gpu"; Mosaic GPU interpreter), else None."""
    try:
        from jax._src import config

        params = config.pallas_tpu_interpret_mode_context_manager.value
    except (ImportError, AttributeError):  # a jax without interpret modes
        return None
    if params is None:
        return None
    is_gpu = type(params).__name__ == "InterpretGPUParams"
    return params if is_gpu == (platform == "gpu") else None


def _pallas_unsupported(implementation, a: AttentionArgs, q, k, v, block_sizes=None):
    platform = _KERNEL_PLATFORM[implementation]
    interpreted = _interpret_params(platform) is not None
    if jax.default_backend() != platform and not interpreted:
        how = {
            "tpu": "pltpu.force_tpu_interpret_mode()",
            "gpu": "plgpu.force_gpu_interpret_mode() (jax._src.pallas.mosaic_gpu.interpret)",
        }[platform]
        return (
            f"it runs on {platform.upper()} only (backend is {jax.default_backend()}); "
            f"on CPU, run it under {how}"
        )
    api, reason = _kernel_module(implementation)
    if reason:
        return reason
    if a.dense is not None:
        return "dense mask arrays are not supported by the kernel; use a mask spec"
    if getattr(a.q_offset, "ndim", 0) == 1:
        return "a per-sequence [B] q_offset is not supported by the kernel"
    gate = api.unsupported_reason if platform == "tpu" else api.unsupported_reason_gpu
    return gate(
        q,
        k,
        v,
        mask=a.spec,
        segment_ids=_segments(a),
        q_offset=_offset(a),
        kv_lengths=a.kv_lengths,
        logits_soft_cap=a.logits_soft_cap,
        block_sizes=block_sizes,
    )


def _segments(a: AttentionArgs):
    return None if a.q_segment_ids is None else (a.q_segment_ids, a.kv_segment_ids)


def _offset(a: AttentionArgs):
    return 0 if a.q_offset is None else a.q_offset


def _pallas(implementation, a: AttentionArgs, q, k, v, return_lse, block_sizes):
    api, _ = _kernel_module(implementation)
    fn = api.flash_attention if implementation == "pallas_tpu" else api.flash_attention_gpu
    platform = _KERNEL_PLATFORM[implementation]
    kw = {}
    if jax.default_backend() != platform:
        kw["interpret"] = _interpret_params(platform)
    return fn(
        q,
        k,
        v,
        mask=a.spec,
        segment_ids=_segments(a),
        q_offset=_offset(a),
        kv_lengths=a.kv_lengths,
        scale=a.scale,
        logits_soft_cap=a.logits_soft_cap,
        block_sizes=block_sizes,
        return_lse=return_lse,
        **kw,
    )


def _cudnn_window(a: AttentionArgs):
    """(is_causal, local_window_size) for jax.nn, or None if the spec has no cuDNN form."""
    from jaxattn.masks import Causal, SlidingWindow

    if a.spec is None:
        return False, None
    if isinstance(a.spec, Causal):
        return True, None
    if isinstance(a.spec, SlidingWindow):
        return False, (a.spec.left, a.spec.right)
    return None


def _cudnn_unsupported(a: AttentionArgs, q, return_lse) -> str | None:
    if jax.default_backend() != "gpu":
        return f"cuDNN needs an NVIDIA GPU (backend is {jax.default_backend()})"
    if str(q.dtype) not in ("bfloat16", "float16"):
        return f"cuDNN attention takes bf16/fp16, got {q.dtype}"
    checks = [
        (a.H != a.V, f"qk head dim {a.H} != v head dim {a.V}"),
        (a.logits_soft_cap is not None, "no soft cap"),
        (a.q_segment_ids is not None, "no segment ids"),
        (a.static_q_offset != 0, "no q_offset"),
        (return_lse, "no return_lse"),
        (a.dense is not None, "no dense masks here"),
        (_cudnn_window(a) is None, f"mask {a.spec!r} has no cuDNN form"),
    ]
    return next((why for bad, why in checks if bad), None)


def _cudnn(a: AttentionArgs, q, k, v):
    is_causal, window = _cudnn_window(a)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=a.scale,
        is_causal=is_causal,
        local_window_size=window,
        key_value_seq_lengths=a.kv_lengths,
        implementation="cudnn",
    )
