"""``jaxattn.ops.efficient_probing``: Efficient Probing's multi-query cross-attention pooling.

Psomas et al. 2025, "Attention, Please! Revisiting Attentive Probing for Masked Image
Modeling" (arXiv 2506.10178; as the authors' ``poolings/ep.py``). M learned queries attend to
frozen tokens x with the query and key projections removed (the keys are the tokens
themselves, the queries live directly in token space) and one value projection V = x·W_v of
width E split into M channel groups of E / M; query m pools only its own group:

    A = softmax(Q·xᵀ · scale)                     [B, M, S], scale = 1/sqrt(D)
    pooled[:, m·E/M : (m+1)·E/M] = A_m · V_m      [B, E]  (V_m = V[..., m-th group])

so the M queries together read all E channels once, and the pooled vector feeds a linear
classifier. Padded tokens (``mask_BS`` False) get no weight; a row with no valid token pools
to zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["efficient_probing_pool"]


def efficient_probing_pool(queries_MD, x_BSD, v_BSE, *, mask_BS=None, scale=None):
    """EP pooling (see the module docstring) -> pooled [B, E] in x's dtype.

    Args:
      queries_MD: the M learned queries [M, D].
      x_BSD: the frozen tokens [B, S, D] (the keys).
      v_BSE: the values x·W_v [B, S, E]; E % M == 0.
      mask_BS: optional bool [B, S], True for a real token.
      scale: logit scale (default 1/sqrt(D)), a positive real number.

    Returns:
      pooled_BE: [B, E]; query m's pooling of value channels [m·E/M, (m+1)·E/M).

    Raises:
      ValueError: shapes that do not match, naming the argument.
    """
    q, x, v = (jnp.asarray(a) for a in (queries_MD, x_BSD, v_BSE))
    if q.ndim != 2 or x.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"queries_MD {q.shape}, x_BSD {x.shape} and v_BSE {v.shape} must be [M, D], "
            "[B, S, D] and [B, S, E]"
        )
    m, d = q.shape
    b, s, _ = x.shape
    if x.shape[2] != d or v.shape[:2] != (b, s):
        raise ValueError(
            f"x_BSD {x.shape} must have the queries' width D={d}, and v_BSE {v.shape} x's "
            "batch and length"
        )
    e = v.shape[2]
    if e % m:
        raise ValueError(f"value width E={e} (v_BSE {v.shape}) must be a multiple of M={m}")
    if mask_BS is not None and jnp.shape(mask_BS) != (b, s):
        raise ValueError(f"mask_BS must be [B, S] = {(b, s)}, got {jnp.shape(mask_BS)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale={scale!r} must be a positive real number")
    # logits and softmax in fp32: bf16 loses the max subtraction
    logits_BMS = jnp.einsum("md,bsd->bms", q.astype(jnp.float32), x.astype(jnp.float32)) * scale
    if mask_BS is not None:
        valid_B1S = jnp.asarray(mask_BS, bool)[:, None, :]
        logits_BMS = jnp.where(valid_B1S, logits_BMS, -jnp.inf)
        peak = jnp.max(logits_BMS, axis=-1, keepdims=True)
        w_BMS = jnp.where(
            valid_B1S, jnp.exp(logits_BMS - jnp.where(jnp.isfinite(peak), peak, 0)), 0
        )
        denom = jnp.sum(w_BMS, axis=-1, keepdims=True)
        attn_BMS = w_BMS / jnp.where(denom > 0, denom, 1.0)  # no valid token: zeros, not NaN
    else:
        attn_BMS = jax.nn.softmax(logits_BMS, axis=-1)
    v_BSMG = v.astype(jnp.float32).reshape(b, s, m, e // m)
    pooled_BMG = jnp.einsum("bms,bsmg->bmg", attn_BMS, v_BSMG)
    return pooled_BMG.reshape(b, e).astype(x.dtype)
