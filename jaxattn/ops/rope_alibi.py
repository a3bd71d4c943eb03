"""RoPE + ALiBi (PAPERS.md §3, "The Nature of Mathematical Modeling and Probabilistic
Optimization Engineering in Generative AI", proposal (a)) on the attention op.

The score of query i and key j in head n combines both position schemes, each switchable:

  s_ij = RoPE(q_i, p_i) · RoPE(k_j, p_j) / √H  −  m_n (p_i − p_j)

with ALiBi slopes m_n from a harmonic series (m_n = scale / (n + 1), the proposal's reading)
or ALiBi's geometric one (m_n = 2^(−8(n+1)/N), Press et al.). ``rope=None`` gives pure ALiBi,
``slopes=None`` pure RoPE. (The proposal is loosely specified; this is the additive reading.)

The op has no additive bias, and none is needed: −m_n (p_i − p_j) equals m_n (p_j − p_r)
plus a term constant along the row, which softmax ignores. So the bias rides as one extra head
dimension, q' = [RoPE(q) / √H, m_n], k' = [RoPE(k), p_j − p_r] (p_r: the row's last position,
keeping the coordinate small), and the op runs at scale 1 with its masks, segment ids and block
visits, e.g. PrFlashAttention's sampled lists (``jaxattn.ops.prflash.sample_block_visits``).
The returned LSE is corrected by the dropped row constant. With ALiBi on, q and k are
promoted to float32 for the op (the position coordinate must stay exact; in float32 its
rounding is below 1e-2 · slope up to 10^5 positions); the output keeps q's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxattn.masks import Causal
from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.rope import RopeConfig, apply_rope

__all__ = ["alibi_slopes", "rope_alibi_attention", "SLOPE_SERIES"]

SLOPE_SERIES = ("harmonic", "geometric")
_CAUSAL = Causal()


def alibi_slopes(num_heads: int, *, series: str = "harmonic", scale: float = 1.0) -> np.ndarray:
    """Per-head ALiBi slopes [num_heads] (module docstring), float32.

    Raises:
      ValueError: num_heads < 1, an unknown series, a scale that is not positive.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if series not in SLOPE_SERIES:
        raise ValueError(f"series must be one of {SLOPE_SERIES}, got {series!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    n = np.arange(1, num_heads + 1, dtype=np.float64)
    m = 1.0 / n if series == "harmonic" else 2.0 ** (-8.0 * n / num_heads)
    return (scale * m).astype(np.float32)


def rope_alibi_attention(
    q_BTNH,
    k_BTKH,
    v_BTKV,
    *,
    rope: RopeConfig | None,
    slopes=None,
    positions_BT=None,
    mask=_CAUSAL,
    segment_ids=None,
    block_visits=None,
    return_lse=False,
    implementation="auto",
):
    """Self-attention (T == S, shared positions) under RoPE and ALiBi (module docstring).

    Args:
      rope: the rotation, or None (no RoPE).
      slopes: ALiBi slopes [N] (see :func:`alibi_slopes`), or None (no ALiBi).
      positions_BT: integer positions [B, T]; None: 0..T-1.
      mask, segment_ids, block_visits, implementation: passed to ``dot_product_attention``.

    Returns:
      o [B, T, N, V] (and the LSE [B, N, T] of the scores above when ``return_lse``).

    Raises:
      ValueError: T != S, slopes not of shape [N], positions not of shape [B, T].
    """
    B, T, N, H = q_BTNH.shape
    if k_BTKH.shape[1] != T:
        raise ValueError(f"rope_alibi_attention is self-attention: T={T} != S={k_BTKH.shape[1]}")
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    elif tuple(jnp.shape(positions_BT)) != (B, T):
        raise ValueError(f"positions_BT must have shape {(B, T)}, got {jnp.shape(positions_BT)}")
    positions_BT = jnp.asarray(positions_BT)
    q, k = q_BTNH, k_BTKH
    if rope is not None:
        q, k = apply_rope(q, positions_BT, rope), apply_rope(k, positions_BT, rope)
    q = q * jnp.asarray(1.0 / np.sqrt(H), q.dtype)
    if slopes is None:
        return dot_product_attention(
            q, k, v_BTKV, mask=mask, scale=1.0, segment_ids=segment_ids,
            block_visits=block_visits, return_lse=return_lse, implementation=implementation,
        )  # fmt: skip
    slopes = jnp.asarray(slopes, jnp.float32)
    if slopes.shape != (N,):
        raise ValueError(f"slopes must have shape [N={N}], got {slopes.shape}")
    pos = positions_BT.astype(jnp.float32)
    rel = pos - pos[:, -1:]  # [B, T], <= 0 for increasing positions
    # the position coordinate needs float32 (bf16 holds integers exactly only up to 256)
    dt = jnp.promote_types(q.dtype, jnp.float32)
    q, k = q.astype(dt), k.astype(dt)
    q_aug = jnp.broadcast_to(slopes.astype(q.dtype)[None, None, :, None], (B, T, N, 1))
    k_aug = jnp.broadcast_to(rel.astype(k.dtype)[:, :, None, None], (B, T, k.shape[2], 1))
    out = dot_product_attention(
        jnp.concatenate([q, q_aug], -1), jnp.concatenate([k, k_aug], -1), v_BTKV,
        mask=mask, scale=1.0, segment_ids=segment_ids, block_visits=block_visits,
        return_lse=return_lse, implementation=implementation,
    )  # fmt: skip
    if not return_lse:
        return out.astype(q_BTNH.dtype)
    o, lse = out
    o = o.astype(q_BTNH.dtype)
    # q'·k' = s_ij + m_n (p_i − p_r): the row constant m_n (p_i − p_r) comes off the LSE
    return o, lse - slopes[None, :, None] * rel[:, None, :]
