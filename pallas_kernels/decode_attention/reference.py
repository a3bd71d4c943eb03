"""Plain-jnp reference of decode attention (a few queries over a long, ragged KV cache).

Query ``t`` of sequence ``b`` sits at position ``p = q_offsets[b] + t`` on the cache axis, by
default ``q_offsets = kv_lengths - T`` (the last T tokens written into the cache are the
queries' own). Key ``j`` is visible when
``j <= p`` and ``j < kv_lengths[b]``, and with ``window=W`` also ``p - j < W``. Then

    o[b, t, n] = softmax_j(s[b, n, t, j]) @ v[b, :, n // G],
    s = soft_cap(scale * q[b, t, n] . k[b, j, n // G]),  soft_cap(x) = c * tanh(x / c),

with GQA (G = N / K query heads per kv head). A row with no visible key gives o = 0 and
lse = -inf. Scores and accumulation are fp32, whatever the input dtype. Materialises the
[B, K, G, T, C] score tensor: a test oracle, not a fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["decode_attention_reference", "visible_mask"]


def visible_mask(
    kv_lengths_B, num_queries: int, cache_len: int, window: int | None = None, q_offsets_B=None
):
    """Bool mask_BTC: may query t of sequence b see key j.

    Args:
      kv_lengths_B: int [B] valid cache length per sequence (queries included).
      num_queries: T, the number of queries per sequence.
      cache_len: C, the cache length.
      window: W, keys within W positions of the query (p - j < W), or None for all.
      q_offsets_B: int [B] position of query 0, default kv_lengths - T.

    Returns:
      bool [B, T, C].
    """
    kv_lengths_B = jnp.asarray(kv_lengths_B, jnp.int32)
    if q_offsets_B is None:
        q_offsets_B = kv_lengths_B - num_queries
    q_offsets_B = jnp.asarray(q_offsets_B, jnp.int32)
    q_pos_BT1 = (q_offsets_B[:, None] + jnp.arange(num_queries))[:, :, None]
    k_pos_11C = jnp.arange(cache_len)[None, None, :]
    mask_BTC = (k_pos_11C <= q_pos_BT1) & (k_pos_11C < kv_lengths_B[:, None, None])
    if window is not None:
        mask_BTC &= q_pos_BT1 - k_pos_11C < window
    return mask_BTC


def decode_attention_reference(
    q_BTNH,
    k_BCKH,
    v_BCKV,
    kv_lengths_B,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
    q_offsets_B=None,
):
    """Decode attention, computed densely in fp32.

    Args:
      q_BTNH: queries [B, T, N, H].
      k_BCKH: key cache [B, C, K, H], N % K == 0.
      v_BCKV: value cache [B, C, K, V].
      kv_lengths_B: int [B], valid length of each sequence's cache (0 <= len <= C).
      scale: multiplies q.k; default 1/sqrt(H).
      logits_soft_cap: c in c * tanh(s / c), applied after scaling; None for none.
      window: sliding window W (p - j < W), or None.
      return_lse: also return the log-sum-exp of the (capped) scores.
      q_offsets_B: int [B] position of query 0 of each sequence (default kv_lengths - T).

    Returns:
      o_BTNV in q's dtype, and lse_BNT (float32, -inf for rows with no visible key) if asked.
    """
    B, T, N, H = q_BTNH.shape
    _, C, K, _ = k_BCKH.shape
    G = N // K
    scale = H**-0.5 if scale is None else scale
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H).astype(jnp.float32)
    s_BKGTC = (
        jnp.einsum(
            "btkgh,bckh->bkgtc",
            q_BTKGH,
            k_BCKH.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        * scale
    )
    if logits_soft_cap is not None:
        s_BKGTC = logits_soft_cap * jnp.tanh(s_BKGTC / logits_soft_cap)
    mask_B11TC = visible_mask(kv_lengths_B, T, C, window, q_offsets_B)[:, None, None]
    s_BKGTC = jnp.where(mask_B11TC, s_BKGTC, -jnp.inf)
    m_BKGT1 = jnp.max(s_BKGTC, axis=-1, keepdims=True)
    # Rows with no visible key have max -inf; shift by 0 there so exp gives 0, not NaN.
    m_BKGT1 = jnp.where(jnp.isfinite(m_BKGT1), m_BKGT1, 0.0)
    p_BKGTC = jnp.exp(s_BKGTC - m_BKGT1)
    l_BKGT1 = jnp.sum(p_BKGTC, axis=-1, keepdims=True)
    o_BKGTV = jnp.einsum(
        "bkgtc,bckv->bkgtv",
        p_BKGTC,
        v_BCKV.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    o_BKGTV = o_BKGTV / jnp.where(l_BKGT1 > 0, l_BKGT1, 1.0)
    o_BTNV = o_BKGTV.transpose(0, 3, 1, 2, 4).reshape(B, T, N, -1).astype(q_BTNH.dtype)
    if not return_lse:
        return o_BTNV
    lse_BKGT = jnp.where(l_BKGT1 > 0, m_BKGT1 + jnp.log(l_BKGT1), -jnp.inf)[..., 0]
    return o_BTNV, lse_BKGT.reshape(B, N, T)
