"""The readable reference implementation of the attention op: ``implementation="xla"``.

o_n = softmax(mask(scale · q_n k_{n // G}ᵀ)) v_{n // G} for every query head n, with the
scores materialised as [B, K, G, T, S] in float32. GQA never repeats kv heads: the G query
heads of a group are an extra einsum dimension. Differentiated by JAX autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.ops._attention_args import AttentionArgs, scores_fp32, visible

__all__ = ["xla_attention"]


def xla_attention(a: AttentionArgs, q_BTNH, k_BSKH, v_BSKV, return_lse: bool = False):
    """Reference attention.

    Args:
      a: the validated call (see ``check_args``).
      q_BTNH, k_BSKH, v_BSKV: inputs, one floating dtype.

    Returns:
      o_BTNV in q's dtype; with ``return_lse`` also lse_BNT (float32, -inf for rows that see
      no key). Rows that see no key give zeros and zero gradients.
    """
    B, T, N, H = q_BTNH.shape
    q_BTKGH = q_BTNH.reshape(B, T, a.K, a.G, H)
    s_BKGTS = scores_fp32(a, q_BTKGH, k_BSKH)
    vis = visible(a, jnp.arange(T, dtype=jnp.int32), jnp.arange(a.S, dtype=jnp.int32))
    s_BKGTS = jnp.where(vis, s_BKGTS, -jnp.inf)
    m_BKGT = jnp.max(s_BKGTS, axis=-1)
    # rows with no visible key: shift by 0 so exp(-inf) = 0 gives zeros (not NaN)
    m_BKGT = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m_BKGT), m_BKGT, 0.0))
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
    l_BKGT = jnp.sum(p_BKGTS, axis=-1)
    l_safe = jnp.where(l_BKGT == 0, 1.0, l_BKGT)
    precision = jax.lax.Precision.HIGHEST if v_BSKV.dtype == jnp.float32 else None
    o_BTKGV = jnp.einsum(
        "bkgts,bskv->btkgv",
        p_BKGTS / l_safe[..., None],
        v_BSKV.astype(jnp.float32),
        precision=precision,
    )
    o_BTNV = o_BTKGV.reshape(B, T, N, a.V).astype(q_BTNH.dtype)
    if not return_lse:
        return o_BTNV
    lse_BKGT = jnp.where(l_BKGT == 0, -jnp.inf, m_BKGT + jnp.log(l_safe))
    return o_BTNV, lse_BKGT.reshape(B, N, T)
