"""Agent Attention (Han et al. 2024, arXiv 2312.08874) on a 1-D token sequence.

A quadruple (Q, A, K, V) with n << T agent tokens A. Per head, with σ the row softmax and
``scale`` = 1/sqrt(H):

    agent aggregation:   V_A = σ(scale · A Kᵀ + B1) V          B1 [n, T] (agent bias)
    agent broadcast:     O   = σ(scale · Q Aᵀ + B2) V_A + DWC(V) B2 [T, n] (query bias)

The agents are pooled from the queries (the authors' ``AdaptiveAvgPool`` of Q: agent i is the
mean of queries ``[floor(i T / n), ceil((i + 1) T / n))``, PyTorch's adaptive pooling bins);
DWC is a depthwise convolution over the sequence of the values (per channel, "same" zero
padding, with bias), added to the output as the authors do to restore feature diversity.
The score matrices are [n, T] and [T, n]: cost O(T·n·H), linear in T for a fixed n. Without
biases the two steps are the generalised linear attention φ_q(Q) φ_k(K)ᵀ V of the paper
(φ_q(Q) = σ(Q Aᵀ), φ_k(K) = σ(A Kᵀ)ᵀ).

Adaptations to 1-D: the paper's biases are built on the 2-D image grid (a small interpolated
block bias plus row and column biases); here B1 and B2 are arrays given in full (per head, or
per batch and head), and the 3×3 DWC is a width-W 1-D depthwise convolution. Agents pool over
the whole sequence, so the op is bidirectional (no causal form).

:func:`agent_scores` returns both logit matrices (for cost and pattern checks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["adaptive_pool_matrix", "agent_scores", "agent_attention", "depthwise_conv1d"]


def adaptive_pool_matrix(length: int, num_agents: int) -> np.ndarray:
    """[n, T] float32 averaging matrix of PyTorch's adaptive average pooling from T to n bins.

    Raises:
      ValueError: ``num_agents`` not in [1, length].
    """
    if not 1 <= num_agents <= length:
        raise ValueError(f"num_agents={num_agents} must be in [1, sequence length {length}]")
    p = np.zeros((num_agents, length), np.float32)
    for i in range(num_agents):
        lo, hi = (i * length) // num_agents, -((-(i + 1) * length) // num_agents)
        p[i, lo:hi] = 1.0 / (hi - lo)
    return p


def depthwise_conv1d(x_BTNV, kernel_WNV, bias_NV=None) -> jax.Array:
    """Per-channel convolution over the sequence, "same" zero padding (odd width W):
    y[t, c] = Σ_w kernel[w, c] · x[t + w - W // 2, c] (+ bias[c]) (cross-correlation, as torch)."""
    w = kernel_WNV.shape[0]
    if kernel_WNV.ndim != 3 or kernel_WNV.shape[1:] != x_BTNV.shape[2:] or w % 2 == 0:
        raise ValueError(
            f"dwc kernel must be [odd width, heads, head_dim] = [W, {x_BTNV.shape[2]}, "
            f"{x_BTNV.shape[3]}], got shape {kernel_WNV.shape}"
        )
    t, r = x_BTNV.shape[1], w // 2
    xp = jnp.pad(x_BTNV.astype(jnp.float32), ((0, 0), (r, r), (0, 0), (0, 0)))
    y = sum(xp[:, i : i + t] * kernel_WNV[i].astype(jnp.float32) for i in range(w))
    return y if bias_NV is None else y + bias_NV.astype(jnp.float32)


def _check_bias(name, bias, b, n, rows, cols):
    if bias is None:
        return None
    bias = jnp.asarray(bias, jnp.float32)
    if bias.shape not in ((n, rows, cols), (b, n, rows, cols)):
        raise ValueError(
            f"{name} must be [heads, {rows}, {cols}] or [batch, heads, {rows}, {cols}], got "
            f"shape {bias.shape}"
        )
    return bias


def _check(q_BTNH, k_BTNH, v_BTNV, num_agents, agent_bias, query_bias):
    q, k, v = (jnp.asarray(x) for x in (q_BTNH, k_BTNH, v_BTNV))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, T, heads, dim], got shape {x.shape}")
    if q.shape[:3] != k.shape[:3] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {q.shape}, k {k.shape}, v {v.shape}: agent attention is self-attention with one "
            "kv head per query head (equal [B, T, N]) and q, k of one head dim"
        )
    b, t, n, _ = q.shape
    if isinstance(num_agents, bool) or not isinstance(num_agents, int):
        raise ValueError(f"num_agents={num_agents!r} must be an int")
    pool = adaptive_pool_matrix(t, num_agents)
    b1 = _check_bias("agent_bias", agent_bias, b, n, num_agents, t)
    b2 = _check_bias("query_bias", query_bias, b, n, t, num_agents)
    return q, k, v, pool, b1, b2


def _bias(s, bias):
    return s if bias is None else s + (bias if bias.ndim == 4 else bias[None])


def agent_scores(q_BTNH, k_BTNH, *, num_agents: int, agent_bias=None, query_bias=None, scale=None):
    """(agent logits [B, N, n, T], query logits [B, N, T, n]) in float32, biases added.

    Raises:
      ValueError: as :func:`agent_attention`.
    """
    q, k, _, pool, b1, b2 = _check(q_BTNH, k_BTNH, k_BTNH, num_agents, agent_bias, query_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    a_BANH = jnp.einsum("at,btnh->banh", pool, q)
    s_agent_BNAT = _bias(jnp.einsum("banh,btnh->bnat", a_BANH, k) * scale, b1)
    s_query_BNTA = _bias(jnp.einsum("btnh,banh->bnta", q, a_BANH) * scale, b2)
    return s_agent_BNAT, s_query_BNTA


def agent_attention(
    q_BTNH,
    k_BTNH,
    v_BTNV,
    *,
    num_agents: int,
    agent_bias=None,
    query_bias=None,
    dwc_kernel=None,
    dwc_bias=None,
    scale=None,
) -> jax.Array:
    """Agent attention (module docstring) -> o [B, T, N, V] in v's dtype (fp32 inside).

    Args:
      q_BTNH, k_BTNH: queries and keys [B, T, N, H]; v_BTNV: values [B, T, N, V].
      num_agents: n, agents pooled from the queries, in [1, T].
      agent_bias: B1 [N, n, T] or [B, N, n, T], added to the agents' logits over the keys.
      query_bias: B2 [N, T, n] or [B, N, T, n], added to the queries' logits over the agents.
      dwc_kernel: [W, N, V] (odd W) depthwise convolution of v added to the output (None: no
        DWC); dwc_bias: its bias [N, V] (None: none).
      scale: logit scale (default 1/sqrt(H)).

    Raises:
      ValueError: operands that are not 4-D or differ in [B, T, N]; num_agents out of range;
        a bias or DWC kernel of the wrong shape (the argument named).
    """
    q, k, v, _, _, _ = _check(q_BTNH, k_BTNH, v_BTNV, num_agents, agent_bias, query_bias)
    s_agent_BNAT, s_query_BNTA = agent_scores(
        q, k, num_agents=num_agents, agent_bias=agent_bias, query_bias=query_bias, scale=scale
    )
    va_BANV = jnp.einsum("bnat,btnv->banv", jax.nn.softmax(s_agent_BNAT, -1), v.astype(jnp.float32))
    o_BTNV = jnp.einsum("bnta,banv->btnv", jax.nn.softmax(s_query_BNTA, -1), va_BANV)
    if dwc_kernel is not None:
        o_BTNV = o_BTNV + depthwise_conv1d(v, jnp.asarray(dwc_kernel), dwc_bias)
    elif dwc_bias is not None:
        raise ValueError("dwc_bias is given without dwc_kernel")
    return o_BTNV.astype(v.dtype)
