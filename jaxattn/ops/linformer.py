"""Linformer (Wang et al. 2020, arXiv 2006.04768): keys and values projected along the sequence.

Linformer replaces softmax(Q Kᵀ) V over n keys by attention over k << n projected keys and
values (its eq. 7, per head i):

    head_i = softmax(scale · Q_i (E_i K_i)ᵀ) · (F_i V_i),    E_i, F_i ∈ R^{k×n}

so the score matrix is [n, k] instead of [n, n]: time and memory O(n·k). The projections may
be per kv head (``e_KPS`` [K, P, S]) or shared by all heads (``e_PS`` [P, S]: the paper's
"headwise sharing"); ``f = e`` is its "key-value sharing". Letters: P = k (projected length),
S = n (the projections' sequence length). A shorter input (T_kv < S) uses the first T_kv
columns of E and F, which equals zero-padding the keys and values to length S.

E and F mix positions, so a query sees every key: Linformer is an encoder (bidirectional)
attention. The paper defines no causal form and no incremental decoding, and neither does
this op.

:func:`linformer_scores` returns the [B, N, T, P] logits (the O(n·k) score matrix);
:func:`linformer_attention` runs ``jaxattn.ops.dot_product_attention`` (no mask) over the
projected keys and values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.ops.attention import dot_product_attention

__all__ = ["linformer_project", "linformer_scores", "linformer_attention"]


def _check_proj(name: str, e, s: int, kv_heads: int):
    e = jnp.asarray(e)
    if e.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be [proj_len, seq_len] or [kv_heads, proj_len, seq_len], got shape "
            f"{e.shape}"
        )
    if e.ndim == 3 and e.shape[0] != kv_heads:
        raise ValueError(f"{name} has {e.shape[0]} heads, the keys/values have {kv_heads}")
    if e.shape[-1] < s:
        raise ValueError(
            f"{name} projects sequences of length {e.shape[-1]}, shorter than the input's "
            f"{s} keys (Linformer's n is fixed by its projections)"
        )
    return e


def linformer_project(x_BSKH, e, *, name: str = "e") -> jax.Array:
    """``E X`` along the sequence axis: x [B, S, K, H] -> [B, P, K, H] (first S columns of E).

    Args:
      x_BSKH: keys or values [B, S, K, H].
      e: the projection [P, S'] (shared by heads) or [K, P, S'] (per kv head), S' >= S.
      name: the argument's name for error messages.

    Raises:
      ValueError: ``x`` is not 4-D, ``e`` has a bad rank, head count or too short a length.
    """
    x_BSKH = jnp.asarray(x_BSKH)
    if x_BSKH.ndim != 4:
        raise ValueError(f"keys/values must be [B, S, K, H], got shape {x_BSKH.shape}")
    _, s, kv, _ = x_BSKH.shape
    e = _check_proj(name, e, s, kv)[..., :s].astype(x_BSKH.dtype)
    if e.ndim == 2:
        return jnp.einsum("ps,bskh->bpkh", e, x_BSKH, preferred_element_type=jnp.float32).astype(
            x_BSKH.dtype
        )
    return jnp.einsum("kps,bskh->bpkh", e, x_BSKH, preferred_element_type=jnp.float32).astype(
        x_BSKH.dtype
    )


def _check(q_BTNH, k_BSKH, v_BSKV, e, f):
    q_BTNH, k_BSKH, v_BSKV = (jnp.asarray(x) for x in (q_BTNH, k_BSKH, v_BSKV))
    for name, x in (("q", q_BTNH), ("k", k_BSKH), ("v", v_BSKV)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, len, heads, dim], got shape {x.shape}")
    if k_BSKH.shape[:3] != v_BSKV.shape[:3]:
        raise ValueError(f"k {k_BSKH.shape} and v {v_BSKV.shape} differ in [B, S, K]")
    if q_BTNH.shape[0] != k_BSKH.shape[0] or q_BTNH.shape[-1] != k_BSKH.shape[-1]:
        raise ValueError(f"q {q_BTNH.shape} and k {k_BSKH.shape} differ in batch or head dim")
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise ValueError(
            f"kv heads K={k_BSKH.shape[2]} must divide query heads N={q_BTNH.shape[2]}"
        )
    f = e if f is None else f
    s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
    e, f = _check_proj("e", e, s, kv), _check_proj("f", f, s, kv)
    if e.shape[-2] != f.shape[-2]:
        raise ValueError(f"e projects to {e.shape[-2]} rows and f to {f.shape[-2]}: must match")
    return q_BTNH, k_BSKH, v_BSKV, e, f


def linformer_scores(q_BTNH, k_BSKH, e, *, scale=None) -> jax.Array:
    """The logits ``scale · Q (E K)ᵀ`` [B, N, T, P] in float32 (the O(n·k) score matrix).

    Raises:
      ValueError: as :func:`linformer_attention`.
    """
    q_BTNH, k_BSKH, _, e, _ = _check(q_BTNH, k_BSKH, k_BSKH, e, None)
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    scale = 1.0 / (h**0.5) if scale is None else scale
    kp_BPKH = linformer_project(k_BSKH, e, name="e").astype(jnp.float32)
    q_BTKGH = q_BTNH.astype(jnp.float32).reshape(b, t, kv, n // kv, h)
    s_BKGTP = jnp.einsum("btkgh,bpkh->bkgtp", q_BTKGH, kp_BPKH) * scale
    return s_BKGTP.reshape(b, n, t, -1)


def linformer_attention(
    q_BTNH, k_BSKH, v_BSKV, e, f=None, *, scale=None, implementation="auto"
) -> jax.Array:
    """Linformer attention (module docstring) -> o [B, T, N, V].

    Args:
      q_BTNH: queries [B, T, N, H].
      k_BSKH: keys [B, S, K, H]; K divides N (GQA).
      v_BSKV: values [B, S, K, V].
      e: key projection E, [P, S'] or [K, P, S'] with S' >= S.
      f: value projection F, same shapes as ``e``; None: ``f = e`` (key-value sharing).
      scale: logit scale, default 1/sqrt(H).
      implementation: ``dot_product_attention``'s backend over the P projected keys.

    Raises:
      ValueError: operands that are not 4-D or disagree in batch, heads or head dim; E / F
        with a bad rank, head count, a length shorter than S, or different P (named).
    """
    q_BTNH, k_BSKH, v_BSKV, e, f = _check(q_BTNH, k_BSKH, v_BSKV, e, f)
    kp_BPKH = linformer_project(k_BSKH, e, name="e")
    vp_BPKV = linformer_project(v_BSKV, f, name="f")
    return dot_product_attention(
        q_BTNH, kp_BPKH, vp_BPKV, scale=scale, implementation=implementation
    )
