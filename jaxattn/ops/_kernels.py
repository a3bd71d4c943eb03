"""The op's kernel implementations: gates ("why can it not serve this call") and calls.

Pallas flash attention on TPU and GPU (``pallas_kernels.flash_attention``: "pallas_tpu",
"pallas_gpu"), the Pallas decode kernels (``pallas_kernels.decode_attention``:
"pallas_tpu_decode", "pallas_gpu_decode"; causal or sliding-window masks over a ragged cache,
differentiable here through the "xla" reference) and cuDNN through ``jax.nn``. Kernel modules
are imported lazily, when a kernel is considered, so that ``import jaxattn`` loads no Pallas
module.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxattn.ops._attention_args import AttentionArgs
from jaxattn.ops._attention_math import split_arrays
from jaxattn.ops.attention_xla import xla_attention

__all__ = [
    "BLOCK_SIZES",
    "KERNELS",
    "block_sizes_owner",
    "candidates",
    "cudnn",
    "cudnn_unsupported",
    "run",
    "unsupported",
]

KERNELS = ("pallas_tpu", "pallas_gpu", "pallas_tpu_decode", "pallas_gpu_decode")
_PLATFORM = {k: ("tpu" if "tpu" in k else "gpu") for k in KERNELS}
_FLASH_BLOCKS = ("BlockSizes", "pallas_kernels.flash_attention.BlockSizes")
BLOCK_SIZES = {
    "pallas_tpu": _FLASH_BLOCKS,
    "pallas_gpu": _FLASH_BLOCKS,
    "pallas_tpu_decode": (
        "DecodeKernelBlockSizes",
        "pallas_kernels.decode_attention.DecodeKernelBlockSizes",
    ),
}
# how to run a kernel's interpreter on CPU (the GPU one is private in this jax)
_INTERPRET_HOW = {
    "tpu": "jax.experimental.pallas.tpu.force_tpu_interpret_mode()",
    "gpu": (
        "jax._src.pallas.mosaic_gpu.interpret.params.force_gpu_interpret_mode("
        "InterpretGPUParams()) (the Mosaic GPU interpreter)"
    ),
}


def block_sizes_owner(block_sizes) -> str | None:
    """'impl|impl' for a kernel's block-sizes type, else None (checked by type name)."""
    cls = type(block_sizes)
    if cls.__module__.startswith("pallas_kernels.flash_attention") and cls.__name__ == "BlockSizes":
        return "pallas_tpu|pallas_gpu"
    if cls.__module__.startswith("pallas_kernels.decode_attention") and (
        cls.__name__ == "DecodeKernelBlockSizes"
    ):
        return "pallas_tpu_decode"
    return None


def candidates(backend: str, *, few_queries: bool) -> tuple[str, ...]:
    """The kernels "auto" tries on ``backend``, best first: for a few queries per sequence the
    decode kernel, then (TPU) flash; the GPU flash kernel tiles 64 query rows, which decoding
    would mostly waste."""
    if backend == "tpu":
        return ("pallas_tpu_decode", "pallas_tpu") if few_queries else ("pallas_tpu",)
    if backend == "gpu":
        return ("pallas_gpu_decode",) if few_queries else ("pallas_gpu",)
    return ()


def interpret_params(platform: str):
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


def _flash_api():
    try:
        from pallas_kernels import flash_attention as api
    except ImportError as e:  # the kernel package is optional in this build
        return None, f"pallas_kernels.flash_attention is not importable ({e})"
    return api, None


def _common_reason(implementation: str, a: AttentionArgs) -> str | None:
    """Reasons shared by every Pallas kernel: platform, dense masks, options."""
    platform = _PLATFORM[implementation]
    if jax.default_backend() != platform and interpret_params(platform) is None:
        return (
            f"it runs on {platform.upper()} only (backend is {jax.default_backend()}); "
            f"on CPU, run it under {_INTERPRET_HOW[platform]}"
        )
    if a.dense is not None:
        return "dense mask arrays are not supported by the kernel; use a mask spec"
    if not isinstance(a.scale, float):
        return "a traced scale is not supported by the kernel (it is compiled in)"
    if a.dropout_rate:
        return "the kernel has no attention dropout (use 'chunked' or 'xla')"
    return None


def unsupported(implementation: str, a: AttentionArgs, q, k, v, block_sizes=None):
    """Why kernel ``implementation`` cannot serve the call, or None."""
    reason = _common_reason(implementation, a)
    if reason:
        return reason
    if implementation.endswith("_decode"):
        return _decode_reason(implementation, a, q, k, v, block_sizes)
    if getattr(a.q_offset, "ndim", 0) == 1:
        return "a per-sequence [B] q_offset is not supported by the kernel"
    if a.Kv != a.K:
        return (
            f"separate key and value head counts (k_BSKH has K={a.K} heads, v_BSKV K_v={a.Kv}): "
            "the dk/dv kernel accumulates both gradients per shared kv head; different head "
            "dims (H != V) alone are served"
        )
    api, reason = _flash_api()
    if reason:
        return reason
    gate = api.unsupported_reason if implementation == "pallas_tpu" else api.unsupported_reason_gpu
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
        block_visits=a.visits,
    )


def _segments(a: AttentionArgs):
    return None if a.q_segment_ids is None else (a.q_segment_ids, a.kv_segment_ids)


def _offset(a: AttentionArgs):
    return 0 if a.q_offset is None else a.q_offset


def run(implementation: str, a: AttentionArgs, q, k, v, return_lse, block_sizes):
    """Calls kernel ``implementation`` (``unsupported`` said None)."""
    if implementation.endswith("_decode"):
        static, arrays = split_arrays(a)
        o, lse = _decode(implementation, static, block_sizes, q, k, v, arrays)
        return (o, lse) if return_lse else o
    api, _ = _flash_api()
    fn = api.flash_attention if implementation == "pallas_tpu" else api.flash_attention_gpu
    platform = _PLATFORM[implementation]
    kw = {}
    if jax.default_backend() != platform:
        kw["interpret"] = interpret_params(platform)
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
        block_visits=a.visits,
        return_lse=return_lse,
        **kw,
    )


def _decode_window(spec):
    """(causal, window) of a spec the decode kernels serve, or None: no mask (every key below
    kv_lengths), Causal, or a causal SlidingWindow(left=W - 1)."""
    from jaxattn.masks import Causal, Full, SlidingWindow

    if spec is None or isinstance(spec, Full):
        return False, None
    if isinstance(spec, Causal):
        return True, None
    if isinstance(spec, SlidingWindow) and spec.right == 0:
        return True, spec.left + 1
    return None


def _decode_reason(implementation: str, a: AttentionArgs, q, k, v, block_sizes) -> str | None:
    checks = [
        (a.q_segment_ids is not None, "no segment ids in the decode kernel"),
        (bool(a.visits), "no block-visit lists in the decode kernel"),
        (
            a.Kv != a.K,
            f"separate key and value head counts (k_BSKH has K={a.K} heads, v_BSKV K_v={a.Kv})",
        ),
        (
            _decode_window(a.spec) is None,
            f"mask {a.spec!r}: the decode kernel serves None, Causal() or "
            "SlidingWindow(left, right=0)",
        ),
    ]
    reason = next((why for bad, why in checks if bad), None)
    if reason:
        return reason
    lens = jnp.zeros((a.B,), jnp.int32)
    interp = jax.default_backend() != _PLATFORM[implementation]
    if implementation == "pallas_tpu_decode":
        from pallas_kernels.decode_attention import DecodeKernelBlockSizes, api

        reason = api.unsupported_reason(q, k, v, lens, interpret=interp)
        bs = block_sizes or DecodeKernelBlockSizes()
        block_kv, _ = bs.resolve(a.B, a.K, a.S)
        if reason is None and block_kv != a.S and block_kv % 8:
            reason = f"DecodeKernelBlockSizes.block_kv={block_kv} must be a multiple of 8"
        return reason
    from pallas_kernels.decode_attention import unsupported_reason_gpu

    return unsupported_reason_gpu(q, k, v, lens, interpret=interp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _decode(implementation, a, block_sizes, q, k, v, arrays):
    return _decode_fwd(implementation, a, block_sizes, q, k, v, arrays)[0]


def _decode_fwd(implementation, a, block_sizes, q, k, v, arrays):
    """The decode kernel's (o, lse) under the op's semantics: query t of sequence b at
    position q_offset[b] + t (no mask: past every key), keys below kv_lengths (default S)."""
    full = dataclasses.replace(a, **arrays)
    causal, window = _decode_window(full.spec)
    lens = jnp.full((a.B,), a.S, jnp.int32) if full.kv_lengths is None else full.kv_lengths
    if causal:
        off = 0 if full.q_offset is None else full.q_offset
        offsets = jnp.broadcast_to(jnp.asarray(off, jnp.int32), (a.B,))
    else:  # no mask: put every query after the last key, so the kernel's causal rule is moot
        offsets = jnp.full((a.B,), a.S, jnp.int32)
    kw = dict(
        q_offsets_B=offsets, scale=a.scale, logits_soft_cap=a.logits_soft_cap, window=window,
        return_lse=True,
    )  # fmt: skip
    platform = _PLATFORM[implementation]
    if jax.default_backend() != platform:
        kw["interpret"] = interpret_params(platform)
    if implementation == "pallas_tpu_decode":
        from pallas_kernels.decode_attention import decode_attention_tpu

        out = decode_attention_tpu(q, k, v, lens, block_sizes=block_sizes, **kw)
    else:
        from pallas_kernels.decode_attention import decode_attention_gpu

        out = decode_attention_gpu(q, k, v, lens, **kw)
    return out, (q, k, v, arrays)


def _decode_bwd(implementation, a, block_sizes, res, cts):
    """Gradients through the "xla" reference (O(T·S) memory, small for decoding)."""
    q, k, v, arrays = res
    full = dataclasses.replace(a, **arrays)
    _, vjp = jax.vjp(lambda q, k, v: xla_attention(full, q, k, v, return_lse=True), q, k, v)
    return (*vjp(cts), jax.tree.map(lambda _: None, arrays))


_decode.defvjp(_decode_fwd, _decode_bwd)


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


def cudnn_unsupported(a: AttentionArgs, q, return_lse) -> str | None:
    """Why cuDNN (through jax.nn) cannot serve the call, or None."""
    if jax.default_backend() != "gpu":
        return f"cuDNN needs an NVIDIA GPU (backend is {jax.default_backend()})"
    if str(q.dtype) not in ("bfloat16", "float16"):
        return f"cuDNN attention takes bf16/fp16, got {q.dtype}"
    checks = [
        (a.H != a.V, f"qk head dim {a.H} != v head dim {a.V}"),
        (a.Kv != a.K, "no separate key and value head counts"),
        (a.logits_soft_cap is not None, "no soft cap"),
        (a.q_segment_ids is not None, "no segment ids"),
        (a.static_q_offset != 0, "no q_offset"),
        (return_lse, "no return_lse"),
        (a.dense is not None, "no dense masks here"),
        (bool(a.visits), "no block-visit lists"),
        (a.dropout_rate > 0, "no attention dropout here"),
        (not isinstance(a.scale, float), "no traced scale"),
        (_cudnn_window(a) is None, f"mask {a.spec!r} has no cuDNN form"),
    ]
    return next((why for bad, why in checks if bad), None)


def cudnn(a: AttentionArgs, q, k, v):
    """jax.nn.dot_product_attention with cuDNN (``cudnn_unsupported`` said None)."""
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
