"""Retrieval-head scores: Wu et al., "Retrieval Head Mechanistically Explains Long-Context
Factuality" (2024), on any model with ``blocks.<i>.attn.pattern`` hook points.

A head *copy-pastes* the token ``w`` generated at query row t when its most-attended key
position ``i = argmax_s p[t, s]`` lies inside the needle span and holds that token,
``x_i == w``. With ``g_h`` the needle tokens head h copy-pasted and ``k`` the needle tokens the
model had to generate, the retrieval score is

    score_h = |g_h ∩ k| / |k|                                       (Wu et al., Sec. 2)

Here each scored row generates one needle token, so ``|k|`` is the number of scored rows and
``score_h`` is the fraction of them at which head h copy-pasted. The generated token is the
model's own greedy choice (``argmax`` of its logits at the row) unless given: a row at which the
model emits a token that is not in the needle adds to ``|k|`` only. Rows are the same positions
for every batch row (one static capture); the needle span may differ per row.

Functions
  copy_paste_hits(p_BNtS, tokens_BS, generated_Bt, needle_BtS) -> hits_BNt   (jnp)
  retrieval_score_reference(...) -> score_N                                  (numpy loops)
  retrieval_scores(model, tokens_BT, rows, needle_BtS) -> (scores_LN, logits_BTV)
  pair_needles(tokens_BT, rows, context)   needle = the (key, value) pair a query row names
  top_heads(scores_LN, k), random_heads(L, N, k, seed), mask_hooks(heads)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.heads._hooks import Capture, mask_heads, resolve_indices
from jaxattn.heads._run import run_with_hooks

__all__ = [
    "copy_paste_hits",
    "retrieval_score_reference",
    "retrieval_scores",
    "pair_needles",
    "top_heads",
    "num_top",
    "random_heads",
    "mask_hooks",
]


def copy_paste_hits(p_BNtS, tokens_BS, generated_Bt, needle_BtS) -> jax.Array:
    """Whether each head copy-pastes at each scored row (Wu et al.'s per-step test).

    Args:
      p_BNtS: attention probabilities [B, N, t, S] at the scored rows.
      tokens_BS: the key tokens [B, S] (the sequence the heads attend over).
      generated_Bt: the token generated at each scored row [B, t].
      needle_BtS: bool [B, t, S], the needle span of each scored row.

    Returns:
      bool [B, N, t]: argmax_s p lies in the needle span and holds the generated token.
      Ties in the argmax go to the first position (``jnp.argmax``).
    """
    B, N, t, S = p_BNtS.shape
    for name, a, shape in (
        ("tokens_BS", tokens_BS, (B, S)),
        ("generated_Bt", generated_Bt, (B, t)),
        ("needle_BtS", needle_BtS, (B, t, S)),
    ):
        if tuple(jnp.shape(a)) != shape:
            raise ValueError(f"{name} must have shape {shape} (from p_BNtS), got {jnp.shape(a)}")
    i_BNt = jnp.argmax(p_BNtS, axis=-1)
    tok_BNt = jnp.take_along_axis(jnp.asarray(tokens_BS)[:, None, :], i_BNt.reshape(B, 1, -1), -1)
    tok_BNt = tok_BNt.reshape(B, N, t)
    in_needle_BNt = jnp.take_along_axis(
        jnp.asarray(needle_BtS)[:, None], i_BNt[..., None], axis=-1
    )[..., 0]
    return in_needle_BNt & (tok_BNt == jnp.asarray(generated_Bt)[:, None, :])


def retrieval_score_reference(p_BNtS, tokens_BS, generated_Bt, needle_BtS, counted_Bt=None):
    """Plain-loop reference of the score ``|g_h ∩ k| / |k|`` per head (see the module doc).

    Args:
      p_BNtS, tokens_BS, generated_Bt, needle_BtS: as in :func:`copy_paste_hits`.
      counted_Bt: bool [B, t], the rows that generate a needle token (``|k|``); None: all.

    Returns:
      float64 numpy [N].
    """
    p = np.asarray(p_BNtS, np.float64)
    B, N, t, _ = p.shape
    counted = np.ones((B, t), bool) if counted_Bt is None else np.asarray(counted_Bt, bool)
    tokens, gen, needle = map(np.asarray, (tokens_BS, generated_Bt, needle_BtS))
    scores = np.zeros(N)
    for n in range(N):
        copied = 0
        for b in range(B):
            for r in range(t):
                if not counted[b, r]:
                    continue
                i = int(np.argmax(p[b, n, r]))
                copied += bool(needle[b, r, i]) and tokens[b, i] == gen[b, r]
        scores[n] = copied / max(int(counted.sum()), 1)
    return scores


def retrieval_scores(
    model, tokens_BT, rows, needle_BtS, *, generated_Bt=None, counted_Bt=None, **model_kwargs
):
    """Retrieval score of every head of every layer, from one forward with pattern captures.

    One causal forward gives each row's probabilities exactly as step-by-step decoding would.
    Captures only the scored rows of ``blocks.<i>.attn.pattern`` (B · N · t · S per layer).

    Args:
      model: a model with ``layers`` and ``blocks.<i>.attn.pattern`` points (``DecoderLM``).
      tokens_BT: int tokens [B, T].
      rows: query rows (static ints) whose logits generate a needle token.
      needle_BtS: bool [B, len(rows), T], each row's needle span.
      generated_Bt: the generated tokens [B, len(rows)]; None: the model's argmax at the rows.
      counted_Bt: bool [B, len(rows)], rows that count (``|k|``); None: all.
      model_kwargs: passed to the model (positions_BT, segment_ids_BT, ...).

    Returns:
      (scores_LN float32 [L, N], logits_BTV).
    """
    layers = getattr(model, "layers", None)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no `layers`: retrieval_scores needs blocks")
    T = jnp.shape(tokens_BT)[1]
    rows = resolve_indices(rows, T, "rows")
    hooks = [Capture(f"blocks.{i}.attn.pattern", positions=rows) for i in range(len(layers))]
    logits_BTV, caps = run_with_hooks(model, tokens_BT, hooks, **model_kwargs)
    idx = np.asarray(rows)
    if generated_Bt is None:
        generated_Bt = jnp.argmax(logits_BTV[:, idx], axis=-1)
    B = jnp.shape(tokens_BT)[0]
    counted_Bt = jnp.ones((B, len(rows)), bool) if counted_Bt is None else counted_Bt
    counted_Bt = jnp.asarray(counted_Bt, bool)
    if counted_Bt.shape != (B, len(rows)):
        raise ValueError(f"counted_Bt must have shape {(B, len(rows))}, got {counted_Bt.shape}")
    total = jnp.maximum(jnp.sum(counted_Bt), 1)
    scores = []
    for i in range(len(layers)):
        hits_BNt = copy_paste_hits(caps[f"blocks.{i}.attn.pattern"], tokens_BT, generated_Bt,
                                   needle_BtS)  # fmt: skip
        scores.append(jnp.sum(hits_BNt & counted_Bt[:, None], axis=(0, 2)) / total)
    return jnp.stack(scores).astype(jnp.float32), logits_BTV


def pair_needles(tokens_BT, rows, context: int) -> jax.Array:
    """Needle spans of key-value recall: row t's needle is every (key, value) pair
    ``(s, s + 1)`` with ``s + 1 < context`` whose key ``tokens[s]`` is the query
    ``tokens[t]`` (the pair ``k v`` the query ``k`` names).

    Returns:
      bool [B, len(rows), T].
    """
    tokens_BT = jnp.asarray(tokens_BT)
    B, T = tokens_BT.shape
    if not 2 <= context <= T:
        raise ValueError(f"context={context} must be in [2, T={T}]")
    idx = np.asarray(resolve_indices(rows, T, "rows"))
    s = jnp.arange(T)
    key_BtS = (tokens_BT[:, None, :] == tokens_BT[:, idx, None]) & (s < context - 1)
    value_BtS = jnp.pad(key_BtS[..., :-1], ((0, 0), (0, 0), (1, 0)))
    return key_BtS | value_BtS


def num_top(num_heads_total: int, fraction: float = 0.05) -> int:
    """How many heads are the top ``fraction``: ``max(1, round(fraction · total))``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    return max(1, int(math.floor(fraction * num_heads_total + 0.5)))


def top_heads(scores_LN, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring heads as (layer, head), best first (ties: lower index)."""
    s = np.asarray(scores_LN)
    if s.ndim != 2:
        raise ValueError(f"scores_LN must be [layers, heads], got shape {s.shape}")
    if not 1 <= k <= s.size:
        raise ValueError(f"k={k} must be in [1, {s.size}] (layers x heads)")
    order = np.argsort(-s.reshape(-1), kind="stable")[:k]
    return [(int(i) // s.shape[1], int(i) % s.shape[1]) for i in order]


def random_heads(num_layers: int, num_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """``k`` distinct (layer, head) pairs drawn uniformly with ``numpy`` seed ``seed``."""
    if not 1 <= k <= num_layers * num_heads:
        raise ValueError(f"k={k} must be in [1, {num_layers * num_heads}]")
    flat = np.random.default_rng(seed).choice(num_layers * num_heads, k, replace=False)
    return sorted((int(i) // num_heads, int(i) % num_heads) for i in flat)


def mask_hooks(heads) -> list:
    """``mask_heads`` interventions on ``blocks.<layer>.attn.z`` zeroing (layer, head) pairs."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    return [mask_heads(f"blocks.{i}.attn.z", hs) for i, hs in sorted(by_layer.items())]
