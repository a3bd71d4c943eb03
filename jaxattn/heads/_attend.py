"""The attention op at the hook points q, k, v, scores and pattern.

With hooks at q / k / v only, the layer's op runs as usual on the (possibly changed)
operands. Captures of ``scores`` / ``pattern`` ask the op for its LSE and recompute, for the
chosen heads and query rows only, exactly what it used: the same operands, scale, soft cap,
mask spec, segments, kv lengths and visit lists (``jaxattn.ops`` ``visible`` / ``scores_fp32``),
so p = exp(s - lse) on visible keys and 0 elsewhere (rows that see no key are zeros). An
*intervention* on ``scores`` or ``pattern`` needs the probabilities inside the op: that layer's
attention then runs on the "xla" path (all B · N · T · S probabilities materialised) with the
edit applied between the softmax and the value product, dropout after it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.heads._hooks import ATTN_POINTS, PROB_POINTS, Capture, Intervene, resolve_indices, sow
from jaxattn.ops._attention_args import AttentionArgs, check_args
from jaxattn.ops._attention_math import (
    dropout_keep,
    precision,
    regroup,
    scores_fp32,
    visible,
    visit_mask,
)
from jaxattn.ops.attention import dot_product_attention

__all__ = ["hooked_attend", "probabilities"]

_INPUTS = ATTN_POINTS[:3]  # attn.q, attn.k, attn.v
_MASK_ARGS = ("mask", "scale", "logits_soft_cap", "segment_ids", "q_offset", "kv_lengths")
_OTHER_ARGS = ("block_visits", "dropout_rate", "dropout_rng", "implementation", "block_sizes")


def hooked_attend(hooks, layer, q, kv, ctx) -> jax.Array:
    """``layer.attend(q, kv, ctx)`` with the hooks at its q, k, v, scores, pattern points.

    Returns:
      o_BTNV, as the layer's op gives it (the "xla" path when scores / pattern are edited).
    """
    points = [p for p in (*_INPUTS, *PROB_POINTS) if hooks.at(ctx, p)]
    if not points:
        return layer.attend(q, kv, ctx)
    if not has_operands(layer):
        raise NotImplementedError(
            f"hook points {[hooks.full_name(ctx, p) for p in points]} need "
            f"{type(layer).__name__}.attention_inputs and .attention_args (the op's operands and "
            "arguments); the kind overrides attend without them"
        )
    operands = layer.attention_inputs(q, kv, ctx)
    q_BTNH, k_BSKH, v_BSKV = (
        hooks.point(layer, ctx, p, x) for p, x in zip(_INPUTS, operands, strict=True)
    )
    kw = layer.attention_args(ctx)
    unknown = sorted(set(kw) - {*_MASK_ARGS, *_OTHER_ARGS})
    if unknown:
        raise ValueError(
            f"{type(layer).__name__}.attention_args has unknown op arguments {unknown}"
        )
    on_probs = hooks.at(ctx, "attn.scores") + hooks.at(ctx, "attn.pattern")
    if not on_probs:
        return dot_product_attention(q_BTNH, k_BSKH, v_BSKV, **kw)
    if any(isinstance(h, Intervene) for h in on_probs):
        return _edited_attention(hooks, layer, ctx, q_BTNH, k_BSKH, v_BSKV, kw)
    o_BTNV, lse_BNT = dot_product_attention(q_BTNH, k_BSKH, v_BSKV, **kw, return_lse=True)
    a = _op_args(q_BTNH, k_BSKH, v_BSKV, kw, dropout=False)
    for point in PROB_POINTS:
        name = hooks.full_name(ctx, point)
        for h in hooks.at(ctx, point):  # captures only (no intervention on this path)
            heads, rows = _heads_rows(h, name, a)
            lse = lse_BNT if point == "attn.pattern" else None
            sow(layer, name, _rows_of(a, q_BTNH, k_BSKH, lse, heads, rows))
    return o_BTNV


def has_operands(layer) -> bool:
    """Whether ``layer``'s kind says which operands and arguments its op uses."""
    from jaxattn.layers._kinds import AttentionLayer

    cls = type(layer)
    return all(
        getattr(cls, m) is not getattr(AttentionLayer, m)
        for m in ("attention_inputs", "attention_args")
    )


def probabilities(q_BTNH, k_BSKH, lse_BNT, *, heads=None, rows=None, **op_kwargs) -> jax.Array:
    """Attention probabilities of chosen heads and query rows, exactly from the op's LSE.

    p[b, n, t, s] = exp(cap(scale · q[b, t, n] · k[b, s, n // G]) - lse[b, n, t]) where key s is
    visible from row t (mask spec, segments, q_offset, kv_lengths, visit lists), else 0; a row
    that sees no key (lse = -inf) is all zeros. Only B · n · t · S numbers are computed.

    Args:
      q_BTNH, k_BSKH: the op's queries and keys.
      lse_BNT: ``dot_product_attention(..., return_lse=True)``'s LSE for the same call.
      heads: query heads to keep (None: all N); rows: query rows to keep (None: all T).
      op_kwargs: the op's mask / scale / logits_soft_cap / segment_ids / q_offset /
        kv_lengths / block_visits, as given to ``dot_product_attention``.

    Returns:
      p_BntS float32 [B, len(heads), len(rows), S].

    Raises:
      ValueError: bad op arguments, an LSE of the wrong shape, indices out of range.
    """
    unknown = sorted(set(op_kwargs) - {*_MASK_ARGS, "block_visits"})
    if unknown:
        raise ValueError(f"probabilities() got unknown op arguments {unknown}")
    a = _op_args(q_BTNH, k_BSKH, k_BSKH, op_kwargs, dropout=False)
    if tuple(jnp.shape(lse_BNT)) != (a.B, a.N, a.T):
        raise ValueError(f"lse_BNT must have shape {(a.B, a.N, a.T)}, got {jnp.shape(lse_BNT)}")
    heads = resolve_indices(heads, a.N, "heads")
    rows = resolve_indices(rows, a.T, "rows")
    return _rows_of(a, q_BTNH, k_BSKH, jnp.asarray(lse_BNT, jnp.float32), heads, rows)


def _op_args(q, k, v, kw: dict, *, dropout: bool) -> AttentionArgs:
    args = {n: kw.get(n) for n in _MASK_ARGS}
    args["block_visits"] = kw.get("block_visits")
    if dropout:
        args["dropout_rate"] = kw.get("dropout_rate", 0.0)
        args["dropout_rng"] = kw.get("dropout_rng")
    return check_args(q, k, v, **args)


def _heads_rows(h: Capture, name: str, a: AttentionArgs):
    """The heads and query rows ``h`` keeps, checked against N, T and its byte limit."""
    what = f"Capture({h.name!r}) at {name!r}"
    heads = resolve_indices(h.heads, a.N, f"{what}: heads")
    rows = resolve_indices(h.positions, a.T, f"{what}: positions")
    nbytes = a.B * len(heads) * len(rows) * a.S * 4
    if h.max_bytes is not None and nbytes > h.max_bytes:
        raise ValueError(
            f"{what} would hold B={a.B} x heads={len(heads)} x positions={len(rows)} x S={a.S} "
            f"float32 = {nbytes / 2**20:.1f} MiB > max_bytes={h.max_bytes / 2**20:.1f} MiB; "
            "choose heads= / positions=, or pass max_bytes=None to allow it"
        )
    return heads, rows


def _per_head(vis, a: AttentionArgs, heads):
    """``visible``'s [b, K|1, G|1, t, s] as [b, n|1, t, s] for query heads ``heads`` (None: all)."""
    if vis.shape[1] * vis.shape[2] == 1:
        return vis[:, 0]
    vis = jnp.broadcast_to(vis, (vis.shape[0], a.K, a.G, *vis.shape[3:]))
    vis = vis.reshape(vis.shape[0], a.N, *vis.shape[3:])
    return vis if heads is None else vis[:, np.asarray(heads)]


def _rows_of(a: AttentionArgs, q_BTNH, k_BSKH, lse_BNT, heads, rows):
    """Masked scores (``lse_BNT`` None) or probabilities [B, n, t, S] of ``heads`` x ``rows``."""
    n_idx, t_idx = np.asarray(heads), np.asarray(rows, np.int32)
    q_BtnH = q_BTNH[:, t_idx][:, :, n_idx]
    k_BSnH = k_BSKH[:, :, n_idx // a.G]
    s_BntS = scores_fp32(a, q_BtnH, k_BSnH, spec="btnh,bsnh->bnts")
    visits = visit_mask(a)
    extra = None if visits is None else visits[..., t_idx, :]
    vis = visible(a, jnp.asarray(t_idx), jnp.arange(a.S, dtype=jnp.int32), extra=extra)
    vis_BntS = _per_head(vis, a, heads)
    s_BntS = jnp.where(vis_BntS, s_BntS, -jnp.inf)
    if lse_BNT is None:
        return s_BntS
    lse_Bnt = lse_BNT[:, n_idx][:, :, t_idx]
    lse_Bnt = jnp.where(jnp.isfinite(lse_Bnt), lse_Bnt, 0.0)
    return jnp.where(vis_BntS, jnp.exp(s_BntS - lse_Bnt[..., None]), 0.0)


def _select(a: AttentionArgs, name: str, h: Capture, x_BNTS):
    heads, rows = _heads_rows(h, name, a)
    return x_BNTS[:, np.asarray(heads)][:, :, np.asarray(rows)]


def _edited_attention(hooks, layer, ctx, q_BTNH, k_BSKH, v_BSKV, kw) -> jax.Array:
    """The "xla" path with the scores / pattern hooks applied inside (see the module doc)."""
    a = _op_args(q_BTNH, k_BSKH, v_BSKV, kw, dropout=True)
    B, T, N, H = q_BTNH.shape
    q_idx, k_idx = jnp.arange(T, dtype=jnp.int32), jnp.arange(a.S, dtype=jnp.int32)
    s_BKGTS = scores_fp32(a, q_BTNH.reshape(B, T, a.K, a.G, H), k_BSKH)
    vis_BNTS = _per_head(visible(a, q_idx, k_idx, extra=visit_mask(a)), a, None)
    s_BNTS = jnp.where(vis_BNTS, s_BKGTS.reshape(B, N, T, a.S), -jnp.inf)
    for point in PROB_POINTS:
        name = hooks.full_name(ctx, point)
        select = functools.partial(_select, a, name)
        if point == "attn.scores":
            s_BNTS = hooks.point(layer, ctx, point, s_BNTS, select=select)
            # an edit cannot reveal a masked key
            p_BNTS = _softmax_visible(jnp.where(vis_BNTS, s_BNTS, -jnp.inf))
        else:
            p_BNTS = hooks.point(layer, ctx, point, p_BNTS, select=select)
    p_BKGTS = p_BNTS.reshape(B, a.K, a.G, T, a.S)
    if a.dropout_rate:
        keep = dropout_keep(a, q_idx, k_idx)
        p_BKGTS = jnp.where(keep, p_BKGTS * (1.0 / (1.0 - a.dropout_rate)), 0.0)
    o_BTKGV = jnp.einsum(
        "bkgts,bskv->btkgv",
        regroup(p_BKGTS, a.Kv),
        v_BSKV.astype(jnp.float32),
        precision=precision(v_BSKV.dtype),
    )
    return o_BTKGV.reshape(B, T, N, a.V).astype(q_BTNH.dtype)


def _softmax_visible(s_BNTS):
    """Softmax over keys with -inf for masked ones; a row with no visible key gives zeros."""
    m_BNT = jnp.max(s_BNTS, axis=-1)
    m_BNT = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m_BNT), m_BNT, 0.0))
    p_BNTS = jnp.exp(s_BNTS - m_BNT[..., None])
    l_BNT = jnp.sum(p_BNTS, axis=-1)
    return p_BNTS / jnp.where(l_BNT == 0, 1.0, l_BNT)[..., None]
