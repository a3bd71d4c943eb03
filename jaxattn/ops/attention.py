"""``jaxattn.dot_product_attention``: one attention op, several implementations.

Implementations, chosen by name or by ``"auto"``:

* ``"xla"``: the readable reference; materialises the [B, K, G, T, S] scores.
* ``"chunked"``: memory-efficient pure XLA (online softmax over kv blocks, custom VJP,
  O(T·block) memory, masked and unlisted blocks skipped).
* ``"decode"``: a few queries over a long kv axis (decoding): one loop over large kv blocks,
  no padding copies, unused cache capacity skipped.
* ``"pallas_tpu"`` / ``"pallas_gpu"``: Pallas flash kernels (``pallas_kernels.flash_attention``).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on NVIDIA GPUs.

``"auto"`` takes the platform's kernel when it can serve the call and otherwise falls back
to ``"decode"`` for a few queries per sequence (T <= DecodeBlockSizes.max_q) over more than
one kv block and ``"chunked"`` for the rest, logging the kernel fallback once. A name
asked for explicitly that cannot serve the call raises NotImplementedError saying why.
Kernels are imported only when a kernel implementation is considered (``import jaxattn``
loads no Pallas module).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxattn.ops import _kernels
from jaxattn.ops._attention_args import AttentionArgs, check_args
from jaxattn.ops.attention_chunked import ChunkedBlockSizes, chunked_attention
from jaxattn.ops.attention_decode import DecodeBlockSizes, decode_attention, decode_unsupported
from jaxattn.ops.attention_xla import xla_attention

__all__ = ["IMPLEMENTATIONS", "dot_product_attention"]

IMPLEMENTATIONS = ("auto", "xla", "chunked", "decode", *_kernels.KERNELS, "cudnn")

_log = logging.getLogger("jaxattn")
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        _log.warning(msg)


def _as_arrays(*xs):
    """Array-likes (lists, tuples, numbers) as jnp arrays; arrays, and aliasing, untouched."""
    seen = {}
    out = []
    for x in xs:
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            x = seen.setdefault(id(x), jnp.asarray(x))
        out.append(x)
    return out


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
    block_visits=None,
    dropout_rate=0.0,
    dropout_rng=None,
    implementation="auto",
    return_lse=False,
    block_sizes=None,
):
    """Scaled dot-product attention with GQA/MQA, declarative masks and several backends.

    o[b, t, n] = Σ_s softmax_s(cap(scale · q[b, t, n] · k[b, s, n // G])) · v[b, s, n // G_v]
    over the keys s that the mask, segment ids, kv_lengths and block visits leave visible.

    Concrete values are validated; traced ones cannot be and behave as follows: kv_lengths
    are clipped to [0, S]; a q_offset is used as given (a row at a position before every key
    sees none under a causal mask and gives zeros); block-visit counts are clipped to [0, L]
    and out-of-range indices ignored; a traced ``scale`` is a constant (no gradient flows to
    it; the Pallas kernels refuse it).

    Args:
      q_BTNH: queries [B, T, N, H] (an array or array-like).
      k_BSKH: keys [B, S, K, H]; N % K == 0 (G = N // K query heads share a kv head).
      v_BSKV: values [B, S, K_v, V]; V may differ from H (MLA: H = 192, V = 128) and K_v from K
        (N % K_v == 0; query head n reads value head n // (N / K_v)); heads are never repeated.
      mask: a ``jaxattn.masks`` spec, or a dense bool array [T, S], [B, T, S] or [B, N, T, S]
        (True = attend), or None.
      scale: logit scale, default 1/sqrt(H): a positive real (Python, numpy or 0-d array).
      logits_soft_cap: if set (a positive concrete real), logits become cap · tanh(logits /
        cap) (after scaling).
      segment_ids: one int array [B, T] (needs T == S) or a pair (q [B, T], kv [B, S]);
        queries attend only to keys of the same segment.
      q_offset: position of query row 0 on the kv axis: an int, or an int array [] or [B],
        in [0, S] where concrete.
      kv_lengths: int [B] in [0, S] where concrete; keys at positions >= kv_lengths[b] are
        masked.
      block_visits: a ``jaxattn.masks.BlockVisits``: run-time per (batch row, kv head, query
        block) lists of the kv blocks that may be visited, ANDed with everything else.
      dropout_rate: probability in [0, 1) of dropping each attention probability (after the
        softmax; kept ones are scaled by 1 / (1 - rate)), as Hugging Face's
        ``attention_dropout``. 0 (the default) is exactly no dropout. Served by "xla" and
        "chunked", which drop the same entries for the same key.
      dropout_rng: a ``jax.random.key`` (or raw uint32[2] key), required when dropout_rate > 0;
        the mask is a deterministic function of it (the backward recomputes it).
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
    q_BTNH, k_BSKH, v_BSKV = _as_arrays(q_BTNH, k_BSKH, v_BSKV)
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
        block_visits=block_visits,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    auto = implementation == "auto"
    if auto:
        implementation = _choose(a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)
    block_sizes = _block_sizes_for(implementation, block_sizes, auto)
    reason = _unsupported(implementation, a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)
    if reason:
        raise NotImplementedError(
            f"implementation={implementation!r} cannot serve this call: {reason}"
        )
    if implementation == "xla":
        return xla_attention(a, q_BTNH, k_BSKH, v_BSKV, return_lse)
    if implementation == "chunked":
        return chunked_attention(a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)
    if implementation == "decode":
        return decode_attention(a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)
    if implementation == "cudnn":
        return _kernels.cudnn(a, q_BTNH, k_BSKH, v_BSKV)
    return _kernels.run(implementation, a, q_BTNH, k_BSKH, v_BSKV, return_lse, block_sizes)


# which block_sizes type tunes which implementation (kernel types named, not imported)
_BLOCK_SIZES = {
    "chunked": ("ChunkedBlockSizes", "jaxattn.ops.ChunkedBlockSizes"),
    "decode": ("DecodeBlockSizes", "jaxattn.ops.DecodeBlockSizes"),
    **_kernels.BLOCK_SIZES,
}


def _block_sizes_owner(block_sizes) -> str | None:
    """The implementations a block_sizes object tunes, as one string key, or None."""
    if isinstance(block_sizes, ChunkedBlockSizes):
        return "chunked"
    if isinstance(block_sizes, DecodeBlockSizes):
        return "decode"
    return _kernels.block_sizes_owner(block_sizes)


def _accepted() -> str:
    return "; ".join(f"{full} for {impl!r}" for impl, (_, full) in _BLOCK_SIZES.items())


def _block_sizes_for(implementation: str, block_sizes, auto: bool):
    """``block_sizes`` if it tunes ``implementation``; under "auto", None when it tunes another.

    Implementations with nothing to tune ("xla", "cudnn") ignore any known block sizes.

    Raises:
      ValueError: a type no implementation takes, or (named implementation) the wrong type.
    """
    if block_sizes is None:
        return None
    owner = _block_sizes_owner(block_sizes)
    got = type(block_sizes).__name__
    if owner is None:
        raise ValueError(
            f"block_sizes got {got} ({block_sizes!r}), which no implementation takes; "
            f"pass one of: {_accepted()}"
        )
    if implementation in owner.split("|"):
        return block_sizes
    if auto:
        _log_once(f"jaxattn: auto chose {implementation!r}, which ignores block_sizes={got}")
        return None
    want = _BLOCK_SIZES.get(implementation)
    if want is None:  # "xla" and "cudnn" have nothing to tune
        return None
    raise ValueError(
        f"block_sizes for implementation={implementation!r} must be {want[1]}, got {got} "
        f"(which tunes {owner.replace('|', ' / ')})"
    )


def _unsupported(implementation, a: AttentionArgs, q, k, v, return_lse, block_sizes):
    if implementation in ("xla", "chunked"):
        return None
    if implementation == "decode":
        return decode_unsupported(a)
    if implementation == "cudnn":
        return _kernels.cudnn_unsupported(a, q, return_lse)
    return _kernels.unsupported(implementation, a, q, k, v, block_sizes)


def _choose(a: AttentionArgs, q, k, v, return_lse, block_sizes) -> str:
    backend = jax.default_backend()
    decode_bs = block_sizes if isinstance(block_sizes, DecodeBlockSizes) else DecodeBlockSizes()
    for kernel in _kernels.candidates(backend, few_queries=a.T <= decode_bs.max_q):
        kernel_bs = _block_sizes_for(kernel, block_sizes, auto=True) if block_sizes else None
        reason = _unsupported(kernel, a, q, k, v, return_lse, kernel_bs)
        if reason is None:
            return kernel
        _log_once(f"jaxattn: {kernel} cannot serve a call ({reason}); using a pure-XLA one")
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
    few = a.T <= decode_bs.max_q and not isinstance(block_sizes, ChunkedBlockSizes)
    if few and decode_unsupported(a) is None:
        return "decode"  # few queries: one pass over large kv blocks, no query tiling
    return "chunked"
