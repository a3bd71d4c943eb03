"""Probabilistic FlashAttention (PAPERS.md §3, "The Nature of Mathematical Modeling and
Probabilistic Optimization Engineering in Generative AI", proposal (b)) on block visits.

A distribution over block distances decides which kv blocks take part: for query block r and a
causal kv block c <= r, the block is visited with probability π(r - c) (the diagonal block,
distance 0, always), independently per (batch row, kv head, query block, kv block) from a
``jax.random`` key. The lists go to ``dot_product_attention(block_visits=..., mask=Causal())``,
so unvisited blocks cost nothing and the causal lower-triangular shape is kept. π ≡ 1 visits
every causal block: exact causal attention. (The proposal is loosely specified; this is the
block-skipping reading of it.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import BlockVisits, Causal
from jaxattn.ops.attention import dot_product_attention

__all__ = ["sample_block_visits", "prflash_attention"]


def sample_block_visits(key, keep_prob_by_distance, *, batch, kv_heads, num_blocks, block):
    """BlockVisits [batch, kv_heads, nb, nb]: block c of query block r listed with probability
    π(r - c) for c < r (π read from ``keep_prob_by_distance``; distances past its end keep
    its last value), c = r always, c > r never.

    Raises:
      ValueError: probabilities outside [0, 1].
    """
    pi = np.asarray(keep_prob_by_distance, np.float32)
    if pi.ndim != 1 or pi.size == 0 or (pi < 0).any() or (pi > 1).any():
        raise ValueError(f"keep_prob_by_distance must be a 1-D array in [0, 1], got {pi}")
    r, c = np.arange(num_blocks)[:, None], np.arange(num_blocks)[None]
    dist = np.clip(r - c, 0, None)
    prob = np.where(c <= r, pi[np.minimum(dist, pi.size - 1)], 0.0)
    prob = np.where(c == r, 1.0, prob)
    keep = jax.random.uniform(key, (batch, kv_heads, num_blocks, num_blocks)) < prob
    order = jnp.argsort(~keep, axis=-1, stable=True).astype(jnp.int32)
    counts = keep.sum(-1).astype(jnp.int32)
    return BlockVisits(indices=order, counts=counts, block_q=block, block_kv=block)


def prflash_attention(
    q_BTNH, k_BTKH, v_BTKV, key, keep_prob_by_distance, *, block: int, implementation="auto"
):
    """Causal attention over the sampled blocks (module docstring): o_BTNV."""
    B, T = q_BTNH.shape[:2]
    nb = -(-T // block)
    visits = sample_block_visits(
        key, keep_prob_by_distance, batch=B, kv_heads=k_BTKH.shape[2], num_blocks=nb, block=block
    )
    return dot_product_attention(
        q_BTNH, k_BTKH, v_BTKV, mask=Causal(), block_visits=visits, implementation=implementation
    )
