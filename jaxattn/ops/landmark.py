"""Landmark attention (Mohtashami & Jaggi 2023, arXiv 2305.16300) on block visits.

The sequence is cut into blocks of ``block`` tokens whose last token is the block's landmark
(the paper inserts a landmark token after every ``block - 1`` regular tokens; ``block`` here
is the paper's ℓ_block + 1). For query i in block p (keys j <= i, causal):

* its own group is the regular tokens of block p (the landmark of block p is masked, even
  for the landmark query itself) together with the landmarks l_b of the earlier blocks
  b < p; one softmax over this group gives S_ij for the own tokens and S_{i,l_b} for the
  landmarks;
* each earlier block b is its own group: a softmax over its regular tokens, gated by
  S_{i,l_b}. The final weights are W_ij = S_ij (own block), S_{i,l_b} · softmax_b(s_i)_j
  (regular token of block b) and 0 (landmarks): the paper's grouped softmax (§3.1), as its
  reference code (``landmark_grouped_softmax``) computes it.

At inference the top-k earlier blocks by landmark score are retrieved and the same grouped
softmax runs over the retrieved blocks only (the landmarks of the others leave the own
group), as the reference's memory cache does; with k = every earlier block it is the
training form. For GQA the k blocks are chosen per kv head, by the largest landmark
probability over the group's query heads (the reference's "max_over_heads", per group;
G = 1 is its "per_token_and_head").

:func:`landmark_attention` runs this as two calls of ``dot_product_attention``: the own
block (per-token ``BlockVisits`` listing block p, causal, landmark keys excluded by segment
ids) with its LSE, and the retrieved blocks (each query row repeated k times, row r listing
its r-th block: one softmax per block, with its LSE as the block's normaliser), merged with
the dense landmark logits [T, T / block] by one log-sum-exp. :func:`landmark_reference`
builds the dense [T, S] grouped softmax directly (the readable form, fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import BlockVisits, Causal
from jaxattn.ops.attention import dot_product_attention

__all__ = ["landmark_scores", "landmark_select", "landmark_attention", "landmark_reference"]


def _check(q_BTNH, k_BSKH, block, top_k):
    if not isinstance(block, int) or block < 2:
        raise ValueError(f"block={block!r} must be an int >= 2 (block - 1 tokens + a landmark)")
    S = k_BSKH.shape[1]
    nl = S // block
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= max(nl, 1)):
        raise ValueError(f"top_k={top_k!r} must be None or an int in [1, landmarks={nl}]")
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise ValueError(f"query heads {q_BTNH.shape[2]} must be a multiple of kv heads")


def _positions(T, q_offset):
    """int32 [B or 1, T]: the kv-axis position of each query row."""
    off = jnp.zeros((), jnp.int32) if q_offset is None else jnp.asarray(q_offset, jnp.int32)
    return jnp.reshape(off, (-1, 1)) + jnp.arange(T, dtype=jnp.int32)


def landmark_scores(q_BTNH, k_BSKH, *, block, scale=None, q_offset=None):
    """Scaled landmark logits, fp32 [B, T, N, nl] (nl = S // block complete blocks), -inf
    where the landmark's block is not earlier than the query's block."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    nl = k_BSKH.shape[1] // block
    k_land = k_BSKH[:, block - 1 : nl * block : block].astype(jnp.float32)  # [B, nl, K, H]
    q = q_BTNH.astype(jnp.float32).reshape(B, T, K, N // K, H)
    s = jnp.einsum("btkgh,blkh->btkgl", q, k_land).reshape(B, T, N, nl) * scale
    earlier = jnp.arange(nl) < (_positions(T, q_offset) // block)[..., None]  # [B|1, T, nl]
    return jnp.where(earlier[:, :, None], s, -jnp.inf)


def landmark_select(scores_BTNL, *, num_kv_heads, top_k):
    """The k retrieved blocks per (row, query, kv head): int32 [B, T, K, k] and a bool valid
    mask (False where fewer than k blocks are earlier). Blocks are ranked by landmark
    probability (softmax over the landmarks), the largest over the group's query heads."""
    B, T, N, nl = scores_BTNL.shape
    p = jax.nn.softmax(jax.lax.stop_gradient(scores_BTNL), axis=-1)
    p = jnp.where(jnp.isfinite(scores_BTNL), p, -1.0)  # never pick a later block over an earlier
    p = p.reshape(B, T, num_kv_heads, N // num_kv_heads, nl).max(3)
    top, idx = jax.lax.top_k(p, top_k)
    return idx.astype(jnp.int32), top >= 0


def landmark_attention(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    block: int,
    top_k: int | None = None,
    scale=None,
    q_offset=None,
    kv_lengths=None,
    implementation="auto",
):
    """Landmark attention (module docstring).

    Args:
      q_BTNH, k_BSKH, v_BSKV: queries [B, T, N, H], keys [B, S, K, H], values [B, S, K, V];
        key j is a landmark when j % block == block - 1.
      block: tokens per block, landmark included (>= 2).
      top_k: earlier blocks retrieved per query (None: all of them, the training form).
      scale: logit scale, default 1/sqrt(H).
      q_offset: kv-axis position of query row 0 (an int or int [B]), for decoding.
      kv_lengths: int [B]: keys at positions >= kv_lengths[b] are masked (a cache's fill).
      implementation: of the two ``dot_product_attention`` calls.

    Returns:
      o_BTNV in q's dtype.
    """
    _check(q_BTNH, k_BSKH, block, top_k)
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    nl, nk = S // block, -(-S // block)
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    pos_BT = jnp.broadcast_to(_positions(T, q_offset), (B, T))
    seg_k = jnp.broadcast_to((jnp.arange(S) % block == block - 1).astype(jnp.int32), (B, S))
    common = dict(scale=scale, kv_lengths=kv_lengths, implementation=implementation)

    # own group, part 1: the regular tokens of the query's block (causal), with their LSE
    own = jnp.broadcast_to(jnp.minimum(pos_BT // block, nk - 1)[:, None, :, None], (B, K, T, 1))
    visits = BlockVisits(
        indices=own, counts=jnp.ones((B, K, T), jnp.int32), block_q=1, block_kv=block
    )
    o_own, lse_own = dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKV,
        mask=Causal(),
        q_offset=q_offset,
        segment_ids=(jnp.zeros((B, T), jnp.int32), seg_k),
        block_visits=visits,
        return_lse=True,
        **common,
    )
    lse_own = lse_own.transpose(0, 2, 1)  # [B, T, N]
    if nl == 0:
        return o_own

    # own group, part 2: the landmarks of the retrieved earlier blocks
    s_land = landmark_scores(q_BTNH, k_BSKH, block=block, scale=scale, q_offset=q_offset)
    k_ret = nl if top_k is None else top_k
    if top_k is None:  # every earlier block: slot r is block r
        idx = jnp.broadcast_to(jnp.arange(nl, dtype=jnp.int32), (B, T, K, nl))
        valid = jnp.isfinite(s_land[:, :, :: N // K])
    else:
        idx, valid = landmark_select(s_land, num_kv_heads=K, top_k=k_ret)
    G = N // K
    s_sel = jnp.take_along_axis(
        s_land.reshape(B, T, K, G, nl),
        jnp.broadcast_to(idx[:, :, :, None], (B, T, K, G, k_ret)),
        axis=-1,
    )
    s_sel = jnp.where(valid[:, :, :, None], s_sel, -jnp.inf).reshape(B, T, N, k_ret)

    # every retrieved block is its own softmax: row t·k + r of the repeated queries lists slot r
    q_rep = jnp.repeat(q_BTNH, k_ret, axis=1)  # [B, T·k, N, H]
    vis_ret = BlockVisits(
        indices=idx.transpose(0, 2, 1, 3).reshape(B, K, T * k_ret, 1),
        counts=valid.transpose(0, 2, 1, 3).reshape(B, K, T * k_ret).astype(jnp.int32),
        block_q=1,
        block_kv=block,
    )
    o_ret = dot_product_attention(
        q_rep,
        k_BSKH,
        v_BSKV,
        segment_ids=(jnp.zeros((B, T * k_ret), jnp.int32), seg_k),
        block_visits=vis_ret,
        **common,
    ).reshape(B, T, k_ret, N, -1)

    # one log-sum-exp over the own group (fp32): the own tokens' share and each landmark's gate
    log_z = jnp.logaddexp(lse_own, jax.nn.logsumexp(s_sel, axis=-1))  # lse_own is finite
    w_own = jnp.exp(lse_own - log_z)[..., None]
    gate = jnp.exp(s_sel - log_z[..., None])  # [B, T, N, k]; 0 on invalid slots
    o = w_own * o_own.astype(jnp.float32) + jnp.einsum(
        "btnr,btrnv->btnv", gate, o_ret.astype(jnp.float32)
    )
    return o.astype(q_BTNH.dtype)


def landmark_reference(
    q_BTNH, k_BSKH, v_BSKV, *, block, retrieved_BTNL=None, scale=None, q_offset=None
):
    """Dense grouped softmax of landmark attention, fp32 (module docstring).

    Args:
      retrieved_BTNL: optional bool [B, T, N, nl]: the earlier blocks each query head may use
        (None: all of them, the training form).

    Returns:
      o_BTNV in q's dtype.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    G = N // K
    k = jnp.repeat(k_BSKH.astype(jnp.float32), G, axis=2)
    v = jnp.repeat(v_BSKV.astype(jnp.float32), G, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q_BTNH.astype(jnp.float32), k) * scale
    i = jnp.broadcast_to(_positions(T, q_offset), (B, T))[:, None, :, None]  # [B, 1, T, 1]
    j = jnp.arange(S)[None, None, None, :]
    p_i, p_j = i // block, j // block
    is_land = j % block == block - 1
    if retrieved_BTNL is None:
        keep = jnp.ones((B, N, T, S), bool)
    else:  # block j // block is retrieved (blocks past the landmarks never are)
        nl = S // block
        r = jnp.pad(
            retrieved_BTNL.transpose(0, 2, 1, 3), ((0, 0),) * 3 + ((0, -(-S // block) - nl),)
        )
        keep = jnp.take_along_axis(r, jnp.broadcast_to(p_j, (B, N, T, S)), axis=-1)
    own_tok = (p_j == p_i) & (j <= i) & ~is_land
    land = is_land & (p_j < p_i) & keep
    prev_tok = ~is_land & (p_j < p_i) & keep
    neg = -jnp.inf

    def softmax(mask, group):  # softmax of s within each group id, over the keys in mask
        z = jnp.where(mask, s, neg)
        n_groups = -(-S // block) + 1
        onehot = (group[..., None] == jnp.arange(n_groups)) & mask[..., None]  # [..., S, gr]
        m = jnp.max(jnp.where(onehot, z[..., None], neg), axis=-2)  # [B, N, T, gr]
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.where(onehot, jnp.exp(z[..., None] - m[..., None, :]), 0.0)
        den = e.sum(-2)
        return (e / jnp.where(den > 0, den, 1.0)[..., None, :]).sum(-1)

    # group id: -1 (the own group: own tokens and earlier landmarks) is stored as the last id
    group = jnp.where(own_tok | land, -(-S // block), jnp.broadcast_to(p_j, (B, N, T, S)))
    sm = softmax(own_tok | land | prev_tok, group)
    # the gate of key j's block: the own-group probability of that block's landmark
    land_p = jnp.where(land, sm, 0.0)[..., block - 1 :: block]  # [B, N, T, nl]
    land_p = jnp.pad(land_p, ((0, 0),) * 3 + ((0, -(-S // block) - land_p.shape[-1]),))
    gate = jnp.take_along_axis(land_p, jnp.broadcast_to(p_j, (B, N, T, S)), axis=-1)
    w = jnp.where(own_tok, sm, jnp.where(prev_tok, sm * gate, 0.0))
    return jnp.einsum("bnts,bsnv->btnv", w, v).astype(q_BTNH.dtype)
