"""LM-Infinite (Han et al. 2023, arXiv 2308.16137): Λ-shaped attention with a distance limit.

For the query at position p and key j (RoPE logits depend on p - j only):

    visible:   j <= p  and  (j < n_global  or  p - j < n_local)              (the Λ mask)
    distance:  d(p, j) = min(p - j, n_local)                                (the distance cap)
    logit:     <R(d(p, j)) q_p, k_j> · scale      (q, k before rotation; R = RoPE rotation)

with the cap equal to the local window (the paper sets both to the pre-training length), so
keys in the window keep their true distance and the global (sink) keys outside it are seen at
distance n_local. Computed as two branches merged by their log-sum-exps:

* the window: ``dot_product_attention`` with ``SlidingWindow(left=n_local - 1)`` on rotated q
  and k (blocks outside the window are skipped: cost and memory linear in T);
* the sinks outside the window (j < n_global, p - j >= n_local): for each sink key j, the
  query rotated at position n_local + j against the key rotated at j gives distance n_local
  (a [T, n_global] einsum).

Both branches read keys as stored by a cache (rotated at their positions), so decoding uses
the same function over the cache's keys. :func:`lm_infinite_reference` materialises the
logits from unrotated q, k with explicit per-pair distances and the explicit Λ mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import SlidingWindow
from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.rope import RopeConfig, apply_rope

__all__ = ["lm_infinite_attention", "lm_infinite_reference"]


def lm_infinite_attention(
    q_BTNH,
    q_raw_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    rope: RopeConfig,
    n_global: int,
    n_local: int,
    q_offset=0,
    kv_lengths=None,
    scale=None,
    implementation="auto",
):
    """LM-Infinite attention (module docstring).

    Args:
      q_BTNH: queries rotated at their positions q_offset + t [B, T, N, H].
      q_raw_BTNH: the same queries before rotation.
      k_BSKH: keys rotated at their positions 0..S-1; v_BSKV: values.
      rope: the rotation of q and k.
      n_global: global (sink) keys at the start; n_local: the window, also the distance cap.
      q_offset: int or int [B]; kv_lengths: int [B] or None (keys >= kv_lengths[b] masked).
      scale: logit scale (default 1/sqrt(H)).

    Returns:
      o_BTNV in q's dtype.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    o_w, lse_w = dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKV,
        mask=SlidingWindow(left=n_local - 1),
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        scale=scale,
        implementation=implementation,
        return_lse=True,
    )
    ns = min(n_global, S)
    if ns == 0:
        return o_w
    pos = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))[:, None] + jnp.arange(T)
    # query rotated at n_local + j for sink key j (rotated at j): distance exactly n_local
    q_j = jnp.stack(
        [apply_rope(q_raw_BTNH, jnp.full((B, T), n_local + j, jnp.int32), rope) for j in range(ns)],
        axis=2,
    ).reshape(B, T, ns, K, G, H)
    s = jnp.einsum(
        "btjkgh,bjkh->bkgtj",
        q_j.astype(jnp.float32),
        k_BSKH[:, :ns].astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    s = s * scale
    j = jnp.arange(ns)
    vis = j[None, None] <= pos[..., None] - n_local  # outside the window: the sink branch
    if kv_lengths is not None:
        vis &= j[None, None] < jnp.asarray(kv_lengths)[:, None, None]
    s = jnp.where(vis[:, None, None], s, -jnp.inf)
    lse_s = jax.nn.logsumexp(s, axis=-1)  # [B, K, G, T]; -inf when no sink is outside
    p = jnp.exp(s - jnp.where(jnp.isneginf(lse_s), 0.0, lse_s)[..., None])
    o_s = jnp.einsum("bkgtj,bjkv->btkgv", p, v_BSKV[:, :ns].astype(jnp.float32))
    o_s = o_s.reshape(B, T, N, -1)
    lse_s = lse_s.reshape(B, N, T)
    lse = jnp.logaddexp(lse_w, lse_s)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    w_w = jnp.exp(lse_w - safe).transpose(0, 2, 1)[..., None]
    w_s = jnp.exp(lse_s - safe).transpose(0, 2, 1)[..., None]
    return (w_w * o_w.astype(jnp.float32) + w_s * o_s).astype(q_BTNH.dtype)


def lm_infinite_reference(q_raw_BTNH, k_raw_BSKH, v_BSKV, *, rope, n_global, n_local, scale=None):
    """Dense LM-Infinite over queries and keys at positions 0..T-1 (T == S): logits
    <R(min(p - j, n_local)) q_p, k_j> from unrotated q and k (the query rotated by each pair's
    capped distance), the explicit Λ mask, one softmax. Materialises [B, N, T, T]."""
    B, T, N, H = q_raw_BTNH.shape
    K = k_raw_BSKH.shape[2]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    p, j = np.arange(T)[:, None], np.arange(T)[None]
    lam = (j <= p) & ((j < n_global) | (p - j < n_local))
    dist = np.clip(np.minimum(p - j, n_local), 0, None)  # [T, T]
    # q rotated at every distance 0..n_local: [B, T, N, H] per d
    q_d = jnp.stack(
        [apply_rope(q_raw_BTNH, jnp.full((B, T), d, jnp.int32), rope) for d in range(n_local + 1)]
    )  # [D, B, T, N, H]
    q_pj = q_d[dist, :, np.arange(T)[:, None]]  # [T, T, B, N, H] (query p, key j)
    k = jnp.repeat(k_raw_BSKH, N // K, axis=2).astype(jnp.float32)
    s = jnp.einsum("pjbnh,bjnh->bnpj", q_pj.astype(jnp.float32), k) * scale
    s = jnp.where(jnp.asarray(lam), s, -jnp.inf)
    w = jax.nn.softmax(s, axis=-1)
    v = jnp.repeat(v_BSKV, N // K, axis=2).astype(jnp.float32)
    return jnp.einsum("bnpj,bjnv->bpnv", w, v).astype(q_raw_BTNH.dtype)
