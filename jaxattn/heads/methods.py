"""Head-based readouts on any model with ``blocks.<i>.attn.*`` hook points.

QK-score / attention score (Tulchinskii et al., "Listening to the Wise Few: Select-and-Copy
Attention Heads for Multiple-Choice QA", 2024): for head (l, n), the query row t_q (the end of
the question) and option o's token position s_o,

    QK[l, n, b, o]   = scale · q_n(t_q) · k_{n // G}(s_o)   (the pre-softmax logit, soft cap
                                                             applied if the layer has one)
    ATTN[l, n, b, o] = p_n[t_q, s_o]                         (post-softmax)

and the answer is ``argmax_o``. Heads are chosen on a validation set by accuracy (ties: lower
layer, then head), deterministically.

ICR (Chen et al., "Attention in LLMs Yields Efficient Zero-Shot Re-Rankers", 2024): document d's
score is the attention mass from the query rows onto d's tokens summed over layers and heads,
minus the same with a content-free query; exactly two forward passes for all documents.

AttentionInfluence (Hua et al. 2025): a sample's score is loss(model with the chosen heads
masked) - loss(model); masking no heads gives 0.

LargePiG (2024): the final distribution is ``p_copy · copy + (1 - p_copy) · p_vocab``, with
``copy`` the last layer's head-averaged attention from the last row scattered onto the
vocabulary at the input ids, and ``p_copy`` from the difference between a high layer's and the
last layer's vocabulary distributions (logit lens through the final norm and head). †We take
``p_copy`` = their total-variation distance, which lies in [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.heads._hooks import Capture, mask_heads
from jaxattn.heads._run import run_with_hooks

__all__ = [
    "option_scores",
    "select_heads",
    "icr_scores",
    "attention_influence",
    "largepig",
]


def _num_layers(model) -> int:
    layers = getattr(model, "layers", None)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no `layers` (blocks with hook points)")
    return len(layers)


def option_scores(model, tokens_BT, query_row: int, option_pos_Bo, **model_kwargs):
    """QK-scores and attention scores of every head for each option.

    Args:
      model: a model with ``layers`` and hook points.
      tokens_BT: int tokens [B, T].
      query_row: the (static) query position t_q.
      option_pos_Bo: int [B, o] key positions of the options' tokens (<= query_row).

    Returns:
      (qk_LNBo, attn_LNBo) float32 [L, N, B, o].
    """
    L = _num_layers(model)
    hooks = []
    for i in range(L):
        hooks += [
            Capture(f"blocks.{i}.attn.scores", positions=query_row),
            Capture(f"blocks.{i}.attn.pattern", positions=query_row),
        ]
    pos = jnp.asarray(option_pos_Bo)
    if pos.ndim != 2 or pos.shape[0] != jnp.shape(tokens_BT)[0]:
        raise ValueError(f"option_pos_Bo must be [B, o], got shape {pos.shape}")
    if not isinstance(pos, jax.core.Tracer):
        if int(jnp.max(pos)) > query_row % jnp.shape(tokens_BT)[1] or int(jnp.min(pos)) < 0:
            raise ValueError(f"option positions must be in [0, query_row={query_row}]")
    _, caps = run_with_hooks(model, tokens_BT, hooks, **model_kwargs)

    def at_options(x_BN1S):
        return jnp.take_along_axis(x_BN1S[:, :, 0], pos[:, None, :], axis=-1)  # [B, N, o]

    qk = jnp.stack([at_options(caps[f"blocks.{i}.attn.scores"]) for i in range(L)])
    attn = jnp.stack([at_options(caps[f"blocks.{i}.attn.pattern"]) for i in range(L)])
    return qk.transpose(0, 2, 1, 3), attn.transpose(0, 2, 1, 3)


def select_heads(scores_LNBo, labels_B, k: int = 1):
    """Heads ranked by validation accuracy of ``argmax_o`` (ties: lower layer, then head).

    Returns:
      (heads [(layer, head)] of the top ``k``, accuracy_LN float64 numpy).
    """
    s = np.asarray(scores_LNBo)
    labels = np.asarray(labels_B)
    if s.ndim != 4 or labels.shape != (s.shape[2],):
        raise ValueError(f"scores_LNBo [L, N, B, o] and labels_B [B] needed, got {s.shape}, "
                         f"{labels.shape}")  # fmt: skip
    acc = (np.argmax(s, -1) == labels[None, None]).mean(-1)
    order = np.argsort(-acc.reshape(-1), kind="stable")[:k]
    return [(int(i) // acc.shape[1], int(i) % acc.shape[1]) for i in order], acc


def icr_scores(model, tokens_BT, content_free_BT, query_rows, docs_BdS, **model_kwargs):
    """ICR re-ranking scores [B, d]: query -> document attention mass, calibrated.

    ``content_free_BT`` is the same prompt with the query replaced by content-free tokens of the
    same length (so the rows and documents sit at the same positions). Two forward passes.
    """
    from jaxattn.heads.maps import segment_mass

    if jnp.shape(tokens_BT) != jnp.shape(content_free_BT):
        raise ValueError(f"content_free_BT {jnp.shape(content_free_BT)} must match tokens_BT "
                         f"{jnp.shape(tokens_BT)}")  # fmt: skip
    L = _num_layers(model)
    hooks = [Capture(f"blocks.{i}.attn.pattern", positions=query_rows) for i in range(L)]

    def mass(toks):
        _, caps = run_with_hooks(model, toks, hooks, **model_kwargs)
        total = 0.0
        for i in range(L):
            total = total + segment_mass(caps[f"blocks.{i}.attn.pattern"], docs_BdS).sum((1, 2))
        return total

    return mass(tokens_BT) - mass(content_free_BT)


def attention_influence(model, tokens_BT, targets_BT, weights_BT, heads, **model_kwargs):
    """Per-sample loss(masked ``heads``) - loss(model) [B]; ``heads``: (layer, head) pairs."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    hooks = [mask_heads(f"blocks.{i}.attn.z", hs) for i, hs in sorted(by_layer.items())]
    w = jnp.asarray(weights_BT, jnp.float32)

    def loss(hs):
        logits, _ = run_with_hooks(model, tokens_BT, hs, **model_kwargs)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(lp, jnp.asarray(targets_BT)[..., None], -1)[..., 0]
        return jnp.sum(nll * w, -1) / jnp.maximum(jnp.sum(w, -1), 1e-9)

    return loss(hooks) - loss(())


def largepig(model, tokens_BT, *, high_layer: int, **model_kwargs):
    """LargePiG's distribution at the last row [B, V] and its parts.

    Returns:
      dict: ``p`` (the output, sums to 1), ``p_vocab`` (the model's), ``copy`` (pointer
      distribution on the vocabulary), ``p_copy`` [B], ``p_high`` (logit lens at the input
      of block ``high_layer + 1``).
    """
    L = _num_layers(model)
    if not 0 <= high_layer < L - 1:
        raise ValueError(f"high_layer={high_layer} must be in [0, {L - 2}] (below the last)")
    last = L - 1
    hooks = [
        Capture(f"blocks.{last}.attn.pattern", positions=-1),
        Capture(f"blocks.{high_layer}.resid_post"),
    ]
    logits_BTV, caps = run_with_hooks(model, tokens_BT, hooks, **model_kwargs)
    p_vocab = jax.nn.softmax(logits_BTV[:, -1].astype(jnp.float32), -1)
    h_BD = caps[f"blocks.{high_layer}.resid_post"][:, -1]
    p_high = jax.nn.softmax(model.lm_head(model.final_norm(h_BD)).astype(jnp.float32), -1)
    p_copy = 0.5 * jnp.sum(jnp.abs(p_high - p_vocab), -1)
    ptr_BS = jnp.mean(caps[f"blocks.{last}.attn.pattern"][:, :, 0], axis=1)
    V = p_vocab.shape[-1]
    copy = jax.vmap(lambda ids, w: jnp.zeros((V,), jnp.float32).at[ids].add(w))(
        jnp.asarray(tokens_BT), ptr_BS
    )
    p = p_copy[:, None] * copy + (1.0 - p_copy[:, None]) * p_vocab
    return {"p": p, "p_vocab": p_vocab, "copy": copy, "p_copy": p_copy, "p_high": p_high}
