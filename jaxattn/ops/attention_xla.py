"""The readable reference implementation of the attention op: ``implementation="xla"``.

o_n = softmax(mask(scale · q_n k_{n // G}ᵀ)) v_{n // G_v} for every query head n, with the
scores materialised as [B, K, G, T, S] in float32. GQA never repeats kv heads: the G query
heads of a group are an extra einsum dimension; with a different value head count the
probabilities are regrouped by value heads (a reshape) for the second product. Block-visit
lists enter as a dense mask; dropout multiplies the normalised probabilities by the keep-mask
over (1 - rate). Differentiated by JAX autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.ops._attention_args import AttentionArgs
from jaxattn.ops._attention_math import (
    dropout_keep,
    precision,
    regroup,
    scores_fp32,
    visible,
    visit_mask,
)

__all__ = ["xla_attention"]


def xla_attention(a: AttentionArgs, q_BTNH, k_BSKH, v_BSKV, return_lse: bool = False):
    """Reference attention.

    Args:
      a: the validated call (see ``check_args``).
      q_BTNH, k_BSKH, v_BSKV: inputs, one floating dtype; v may have K_v != K heads.

    Returns:
      o_BTNV in q's dtype; with ``return_lse`` also lse_BNT (float32, -inf for rows that see
      no key; dropout does not change it). Rows that see no key give zeros and zero gradients.
    """
    B, T, N, H = q_BTNH.shape
    q_BTKGH = q_BTNH.reshape(B, T, a.K, a.G, H)
    s_BKGTS = scores_fp32(a, q_BTKGH, k_BSKH)
    q_idx, k_idx = jnp.arange(T, dtype=jnp.int32), jnp.arange(a.S, dtype=jnp.int32)
    vis = visible(a, q_idx, k_idx, extra=visit_mask(a))
    s_BKGTS = jnp.where(vis, s_BKGTS, -jnp.inf)
    m_BKGT = jnp.max(s_BKGTS, axis=-1)
    # rows with no visible key: shift by 0 so exp(-inf) = 0 gives zeros (not NaN)
    m_BKGT = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m_BKGT), m_BKGT, 0.0))
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
    l_BKGT = jnp.sum(p_BKGTS, axis=-1)
    l_safe = jnp.where(l_BKGT == 0, 1.0, l_BKGT)
    p_BKGTS = p_BKGTS / l_safe[..., None]
    if a.dropout_rate:
        keep = dropout_keep(a, q_idx, k_idx)
        p_BKGTS = jnp.where(keep, p_BKGTS * (1.0 / (1.0 - a.dropout_rate)), 0.0)
    o_BTKGV = jnp.einsum(
        "bkgts,bskv->btkgv",
        regroup(p_BKGTS, a.Kv),  # value grouping: query head n reads value head n // G_v
        v_BSKV.astype(jnp.float32),
        precision=precision(v_BSKV.dtype),
    )
    o_BTNV = o_BTKGV.reshape(B, T, N, a.V).astype(q_BTNH.dtype)
    if not return_lse:
        return o_BTNV
    lse_BKGT = jnp.where(l_BKGT == 0, -jnp.inf, m_BKGT + jnp.log(l_safe))
    return o_BTNV, lse_BKGT.reshape(B, N, T)
