"""Run a model with hooks and get the captured values back as plain arrays.

The model is cloned (graph only; arrays are shared, nothing is copied), called with the
hooks, and its :class:`HookCapture` intermediates are popped into a dict. The functions are
pure in the model's arrays, so they work inside ``jax.jit`` / ``nnx.jit``, ``jax.grad``,
``jax.lax.scan`` bodies and under a mesh, with ``train.pretrain.remat_blocks`` models
(``nnx.remat`` carries the sown values out as module state); no tracer outlives its trace.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from flax import nnx

from jaxattn.heads._hooks import (
    PATTERN_MAX_BYTES,
    Capture,
    _unknown,
    hook_names,
    hook_set,
    pop_captures,
)

__all__ = ["decode_with_hooks", "run_with_cache", "run_with_hooks"]


def run_with_hooks(model, tokens_BT, hooks, **model_kwargs):
    """``model(tokens_BT, hooks=hooks, **model_kwargs)`` and its captures.

    Args:
      model: a ``models.DecoderLM`` (any module whose ``__call__`` takes ``hooks=``).
      tokens_BT: int tokens [B, T].
      hooks: Capture / Intervene objects (or a HookSet); see ``jaxattn.heads``.
      model_kwargs: positions_BT, segment_ids_BT, sequence_ids_B, rng.

    Returns:
      (logits_BTV, {point name: captured value}) (layouts in ``jaxattn.heads``).

    Raises:
      ValueError: unknown hook names (close matches listed) and the other hook errors.
    """
    hooks = hook_set(model, hooks)
    m = nnx.clone(model)
    pop_captures(m)  # captures the caller's model still holds are not this call's
    logits_BTV = m(tokens_BT, hooks=hooks, **model_kwargs)
    return logits_BTV, pop_captures(m)


def run_with_cache(
    model,
    tokens_BT,
    names: str | Sequence[str] | Callable[[str], bool] | None = None,
    *,
    pattern_max_bytes: int | None = PATTERN_MAX_BYTES,
    **model_kwargs,
):
    """Capture the values at ``names`` (TransformerLens' ``run_with_cache``).

    Args:
      model, tokens_BT, model_kwargs: as in :func:`run_with_hooks`.
      names: point names or globs (``"blocks.*.attn.z"``), a filter ``name -> bool``, or None
        for every point (``scores`` / ``pattern`` included: all heads and rows, refused past
        ``pattern_max_bytes``; name them with ``Capture(heads=, positions=)`` and
        ``run_with_hooks`` to take fewer).
      pattern_max_bytes: the byte limit of each scores / pattern capture (None: none).

    Returns:
      (logits_BTV, {point name: value}).
    """
    valid = hook_names(model)
    if names is None:
        chosen = list(valid)
    elif callable(names):
        chosen = [n for n in valid if names(n)]
    else:
        chosen = []
        for pattern in (names,) if isinstance(names, str) else names:
            found = [n for n in valid if fnmatch.fnmatchcase(n, pattern)]
            if not found:
                raise _unknown(pattern, valid)
            chosen += [n for n in found if n not in chosen]
    hooks = [Capture(n, max_bytes=pattern_max_bytes) for n in chosen]
    return run_with_hooks(model, tokens_BT, hooks, **model_kwargs)


def decode_with_hooks(model, tokens_BT, cache, hooks, **decode_kwargs):
    """``model.decode(tokens_BT, cache, hooks=hooks, **decode_kwargs)`` and its captures.

    In a cached step q / k / v are the new tokens' operands in the layer's
    ``attention_inputs`` layout (MLA: naive per-head K/V of the new tokens, computed only
    because they are asked for), z / out / resid / mlp are the step's values; scores and
    pattern are refused (the cache attends itself). Use it as a ``jax.lax.scan`` body over
    decode steps to stack captures over steps.

    Returns:
      (logits_BTV, cache, {point name: value}).
    """
    hooks = hook_set(model, hooks)
    m = nnx.clone(model)
    pop_captures(m)
    logits_BTV, cache = m.decode(tokens_BT, cache, hooks=hooks, **decode_kwargs)
    return logits_BTV, cache, pop_captures(m)
