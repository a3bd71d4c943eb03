"""Plain-jnp reference for flash attention (materialises the scores, fp32 accumulation).

It defines the semantics the Pallas kernels are tested against: layout [batch, seq, heads,
dim], grouped kv heads (q head n reads kv head n // G), a mask spec evaluated elementwise at
positions (query row i sits at kv position i + q_offset), segment ids, per-sequence kv
lengths, an optional logit soft cap, and rows with no visible key giving output 0 and
lse = -inf (with zero, never NaN, gradients). Differentiable with ordinary autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    mask=None,
    segment_ids=None,
    q_offset=0,
    kv_lengths=None,
):
    """Which (query, key) pairs are visible.

    Args:
      batch, q_len, kv_len: B, T, S.
      mask: None or a spec with ``spec(q_pos, k_pos) -> bool`` (elementwise).
      segment_ids: None or (q_BT, kv_BS) int arrays; visible only where equal.
      q_offset: position of query row 0 on the kv axis (int or int32 scalar).
      kv_lengths: None or int [B]; keys j >= kv_lengths[b] are masked.

    Returns:
      bool [B, 1, T, S] (broadcasts over heads).
    """
    q_pos_T1 = jnp.arange(q_len, dtype=jnp.int32)[:, None] + jnp.asarray(q_offset, jnp.int32)
    k_pos_1S = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    vis_BTS = jnp.ones((batch, q_len, kv_len), bool)
    if mask is not None:
        vis_BTS &= jnp.broadcast_to(mask(q_pos_T1, k_pos_1S), (q_len, kv_len))[None]
    if segment_ids is not None:
        q_seg_BT, kv_seg_BS = segment_ids
        vis_BTS &= q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    if kv_lengths is not None:
        vis_BTS &= k_pos_1S[None] < jnp.asarray(kv_lengths, jnp.int32)[:, None, None]
    return vis_BTS[:, None]


def attention_reference(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    mask=None,
    segment_ids=None,
    q_offset=0,
    kv_lengths=None,
    scale=None,
    logits_soft_cap=None,
    return_lse=False,
):
    """softmax(scale * q k^T (soft-capped), masked) v, computed densely in fp32.

    Args:
      q_BTNH: queries [B, T, N, H].
      k_BSKH: keys [B, S, K, H], N % K == 0.
      v_BSKV: values [B, S, K, V].
      mask, segment_ids, q_offset, kv_lengths: see ``visible_mask``.
      scale: logit scale, default 1/sqrt(H).
      logits_soft_cap: if given, logits become ``cap * tanh(logits / cap)`` before masking.
      return_lse: also return the log-sum-exp of the visible logits.

    Returns:
      o_BTNV in q's dtype, and lse_BNT (float32, -inf on rows with no visible key) if
      ``return_lse``.
    """
    B, T, N, H = q_BTNH.shape
    _, S, K, _ = k_BSKH.shape
    G = N // K
    scale = H**-0.5 if scale is None else scale
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H).astype(jnp.float32)
    logits_BKGTS = jnp.einsum(
        "btkgh,bskh->bkgts", q_BTKGH, k_BSKH.astype(jnp.float32)
    ) * jnp.float32(scale)
    if logits_soft_cap is not None:
        logits_BKGTS = logits_soft_cap * jnp.tanh(logits_BKGTS / logits_soft_cap)
    vis = visible_mask(
        B, T, S, mask=mask, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths
    )
    vis_B11TS = vis[:, :, None]
    logits_BKGTS = jnp.where(vis_B11TS, logits_BKGTS, -jnp.inf)
    m_BKGT1 = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
    # A row with no visible key has max -inf: shift by 0 instead so exp gives 0, not NaN.
    m_BKGT1 = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m_BKGT1), m_BKGT1, 0.0))
    p_BKGTS = jnp.where(vis_B11TS, jnp.exp(logits_BKGTS - m_BKGT1), 0.0)
    l_BKGT1 = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    empty_BKGT1 = l_BKGT1 == 0.0
    # Divide by 1 on empty rows (the numerator is 0 there) so the gradient stays finite.
    l_safe_BKGT1 = jnp.where(empty_BKGT1, 1.0, l_BKGT1)
    o_BKGTV = jnp.einsum("bkgts,bskv->bkgtv", p_BKGTS, v_BSKV.astype(jnp.float32))
    o_BKGTV = o_BKGTV / l_safe_BKGT1
    o_BTNV = jnp.einsum("bkgtv->btkgv", o_BKGTV).reshape(B, T, N, -1).astype(q_BTNH.dtype)
    if not return_lse:
        return o_BTNV
    lse_BKGT = jnp.where(empty_BKGT1, -jnp.inf, m_BKGT1 + jnp.log(l_safe_BKGT1))[..., 0]
    return o_BTNV, lse_BKGT.reshape(B, N, T)
