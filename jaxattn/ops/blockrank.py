"""BlockRank (Gupta et al. 2025, "Scalable In-context Ranking with Generative Models").

A ranking prompt is [instruction | document 1 | ... | document D | query]. BlockRank's
attention is causal and structured: a document token sees the instruction and its own
document only (no cross-document attention), and the query tokens see every block. Tokens are
labelled by ``doc_ids_BT``: 0 for the instruction, d >= 1 for document d, -1 for the query.

:func:`blockrank_attention` passes the structured mask to ``dot_product_attention`` as a
dense bool mask (its block reduction skips the kv blocks a query block cannot see, so cost
follows the block-diagonal structure); :func:`document_attention` is the attention mass each
query token puts on each document (recomputed from the op's LSE); :func:`contrastive_loss`
is the auxiliary loss on it: InfoNCE over documents with the relevant one as the positive,
L = -log softmax_d(mass_d / τ)[positive].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops.attention import dot_product_attention

__all__ = ["blockrank_mask", "blockrank_attention", "document_attention", "contrastive_loss"]


def blockrank_mask(doc_ids_BT):
    """bool [B, T, T]: causal and (same document, or the key in the instruction, or the query
    row in the query segment)."""
    d = jnp.asarray(doc_ids_BT)
    T = d.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    same = d[:, :, None] == d[:, None, :]
    return causal & (same | (d[:, None, :] == 0) | (d[:, :, None] == -1))


def blockrank_attention(
    q_BTNH, k_BTKH, v_BTKV, doc_ids_BT, *, implementation="auto", return_lse=False
):
    """Attention under the BlockRank mask (module docstring)."""
    return dot_product_attention(
        q_BTNH,
        k_BTKH,
        v_BTKV,
        mask=blockrank_mask(doc_ids_BT),
        implementation=implementation,
        return_lse=return_lse,
    )


def document_attention(q_BTNH, k_BTKH, lse_BNT, doc_ids_BT, num_docs: int, *, scale=None):
    """Attention mass [B, N, T, D] of every query row on each document d = 1..D:
    Σ_{j in doc d} exp(q·k_j·scale - lse) over the keys the mask lets it see."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    k = jnp.repeat(k_BTKH, N // K, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q_BTNH.astype(jnp.float32), k.astype(jnp.float32)) * scale
    p = jnp.where(blockrank_mask(doc_ids_BT)[:, None], jnp.exp(s - lse_BNT[..., None]), 0.0)
    onehot = jax.nn.one_hot(doc_ids_BT - 1, num_docs)  # instruction (0) and query (-1): zero
    return jnp.einsum("bnts,bsd->bntd", p, onehot)


def contrastive_loss(mass_BD, positive_B, *, temperature: float = 0.05):
    """Mean InfoNCE over documents: -log softmax(mass / τ)[positive].

    Raises:
      ValueError: a non-positive temperature.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = jax.nn.log_softmax(mass_BD / temperature, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, positive_B[:, None], axis=-1))
