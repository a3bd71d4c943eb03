"""Core Context Aware attention (CCA-Attention, Chen et al. 2024, arXiv 2412.12465).

Not Compressed Convolutional Attention (§2). Two branches fused in one softmax:

* globality pooling: tokens are split into groups of g; group i becomes one core key / value,
  the importance-weighted sum of its keys / values, weights w = softmax_j(q̄_i · k_j / sqrt(H))
  over the group's tokens j, q̄_i the mean over the kv head's G query heads of the group's last
  query (so a core token uses nothing past its group). A query at position p sees the core
  tokens of the complete groups, (i + 1)·g - 1 <= p;
* locality: the keys of a causal window of w positions, p - w < j <= p.

The softmax runs over [core tokens seen ∪ window keys] jointly: two ``dot_product_attention``
calls (a dense [T, nc] visibility over the core tokens; ``SlidingWindow``) merged by their
log-sum-exps. :func:`core_context_reference` concatenates the core tokens to the keys and
takes one masked softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import SlidingWindow
from jaxattn.ops.attention import dot_product_attention

__all__ = ["core_tokens", "core_context_attention", "core_context_reference"]


def core_tokens(q_BTNH, k_BTKH, v_BTKV, *, group: int):
    """(core keys [B, nc, K, H], core values [B, nc, K, V], weights [B, nc, K, g]) of the
    nc = T // g complete groups."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    nc = T // group
    q_last = q_BTNH[:, group - 1 : nc * group : group].reshape(B, nc, K, N // K, H).mean(3)
    kg = k_BTKH[:, : nc * group].reshape(B, nc, group, K, H)
    vg = v_BTKV[:, : nc * group].reshape(B, nc, group, K, -1)
    s = jnp.einsum("bckh,bcjkh->bckj", q_last.astype(jnp.float32), kg.astype(jnp.float32))
    w = jax.nn.softmax(s / np.sqrt(H), axis=-1)
    kc = jnp.einsum("bckj,bcjkh->bckh", w, kg.astype(jnp.float32)).astype(k_BTKH.dtype)
    vc = jnp.einsum("bckj,bcjkv->bckv", w, vg.astype(jnp.float32)).astype(v_BTKV.dtype)
    return kc, vc, w


def _core_visible(T, nc, group):
    return (np.arange(nc)[None] + 1) * group - 1 <= np.arange(T)[:, None]  # [T, nc]


def core_context_attention(
    q_BTNH, k_BTKH, v_BTKV, *, group: int, window: int, implementation="auto"
):
    """CCA-Attention (module docstring): o_BTNV.

    Raises:
      ValueError: group or window < 1.
    """
    if group < 1 or window < 1:
        raise ValueError(f"group={group} and window={window} must be >= 1")
    T = q_BTNH.shape[1]
    op = dict(implementation=implementation, return_lse=True)
    o_w, lse_w = dot_product_attention(
        q_BTNH, k_BTKH, v_BTKV, mask=SlidingWindow(left=window - 1), **op
    )
    nc = T // group
    if nc == 0:
        return o_w
    kc, vc, _ = core_tokens(q_BTNH, k_BTKH, v_BTKV, group=group)
    o_c, lse_c = dot_product_attention(
        q_BTNH, kc, vc, mask=jnp.asarray(_core_visible(T, nc, group)), **op
    )
    lse = jnp.logaddexp(lse_w, lse_c)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    ww = jnp.exp(lse_w - safe).transpose(0, 2, 1)[..., None]
    wc = jnp.exp(lse_c - safe).transpose(0, 2, 1)[..., None]
    return (ww * o_w.astype(jnp.float32) + wc * o_c.astype(jnp.float32)).astype(q_BTNH.dtype)


def core_context_reference(q_BTNH, k_BTKH, v_BTKV, *, group, window):
    """[core tokens | keys] concatenated, one softmax under the explicit visibility."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    kc, vc, _ = core_tokens(q_BTNH, k_BTKH, v_BTKV, group=group)
    nc = kc.shape[1]
    keys = jnp.concatenate([kc, k_BTKH], 1)
    vals = jnp.concatenate([vc, v_BTKV], 1)
    p, j = np.arange(T)[:, None], np.arange(T)[None]
    vis = np.concatenate([_core_visible(T, nc, group), (j <= p) & (j > p - window)], axis=1)
    keys, vals = (jnp.repeat(x, N // K, axis=2).astype(jnp.float32) for x in (keys, vals))
    s = jnp.einsum("btnh,bsnh->bnts", q_BTNH.astype(jnp.float32), keys) / np.sqrt(H)
    w = jax.nn.softmax(jnp.where(jnp.asarray(vis), s, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnv->btnv", w, vals).astype(q_BTNH.dtype)
