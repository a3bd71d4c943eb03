"""Block-visit lists in the FSA loop order: iterate kv blocks, batch the queries that chose them.

Flash Sparse Attention (PAPERS.md §3, NSA / FSA) reorders NSA's sparse loop: instead of one
query (block) at a time walking its own list of kv blocks (the "chunked" q-major loop: T /
block_q sequential steps of tiny matmuls when lists are per token), the (query block, kv block)
pairs of the lists are sorted by kv block and cut into chunks of ``C`` query blocks that all
chose one kv block. Every chunk is one [G·C·block_q, H] x [H, block_kv] product per (batch
row, kv head), so small GQA groups (G = 1, 2, 4) and per-token lists (block_q = 1) still give
large matmuls. Partial softmax statistics of the chunks are merged per query row by an online
log-sum-exp over groups of chunks (scatter-max / scatter-add into O(T) carries); the custom VJP
recomputes each chunk's probabilities from the saved LSE and scatter-adds dq, dk, dv.

Cost scales with the listed pairs: ceil(Q·L / C) + nk chunks per (batch row, kv head), where
Q·L is the lists' size and nk the kv blocks (at most one partly filled chunk per kv block).
Pairs are deduplicated, unused slots and out-of-range indices dropped, and pairs whose block the
mask spec or kv_lengths rule out entirely are never computed. Everything else (the spec,
kv_lengths, segment ids, q_offset, soft cap, LSE) is applied elementwise as in the other paths.
Only listed blocks are read. Served for one visit list, no dense mask, no dropout and K_v = K
(``unsupported`` says why not); the q-major loop serves the rest.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxattn.ops._attention_args import AttentionArgs
from jaxattn.ops._attention_math import precision

__all__ = ["unsupported", "kv_major_attention", "chunk_tables"]

_ROWS_PER_CHUNK = 128  # query rows per chunk (C · block_q): fills the matmul's rows with G = 1
_GROUP_FLOATS = 1 << 22  # score floats per scan step (16 MiB fp32), over every (b, k)


def unsupported(a: AttentionArgs) -> str | None:
    """Why the kv-major loop cannot serve the call, or None."""
    if len(a.visits) != 1:
        return f"it takes exactly one visit list, got {len(a.visits)}"
    if a.dense is not None:
        return "no dense masks"
    if a.dropout_rate:
        return "no dropout"
    if a.Kv != a.K:
        return f"value heads K_v={a.Kv} must equal key heads K={a.K}"
    return None


def _positions(a: AttentionArgs):
    """q_offset as int32 [B] (or None), kv length per row int32 [B]."""
    off = None if a.q_offset is None else jnp.broadcast_to(jnp.asarray(a.q_offset), (a.B,))
    lens = jnp.full((a.B,), a.S, jnp.int32)
    if a.kv_lengths is not None:
        lens = jnp.minimum(lens, jnp.clip(a.kv_lengths, 0, a.S))
    return off, lens


def chunk_tables(a: AttentionArgs, C: int, off_B, lens_B):
    """(rows [B, K, NC, C] query-block ids (-1: empty slot), blk [B, K, NC] kv block per chunk,
    pos [B, K, Q, L]: the chunk slot (chunk · C + slot) holding each list entry, NC · C if none).

    Pairs are deduplicated, unused and out-of-range slots dropped, and pairs whose block the
    spec's ``block_visible`` or the kv length rule out are dropped before chunking.
    """
    vis = a.visits[0]
    bq, bk = vis.block_q, vis.block_kv
    idx = jnp.broadcast_to(vis.indices, (a.B, a.K, *vis.indices.shape[2:]))
    cnt = jnp.broadcast_to(vis.counts, (a.B, a.K, vis.counts.shape[2]))
    Q, L = idx.shape[2:]
    nk = -(-a.S // bk)
    NC = -(-(Q * L) // C) + nk

    def one(idx_QL, cnt_Q, off, length):
        used = (jnp.arange(L) < cnt_Q[:, None]) & (idx_QL >= 0) & (idx_QL < nk)
        srt = jnp.sort(jnp.where(used, idx_QL, nk), axis=-1)  # duplicates become neighbours
        first = jnp.concatenate([jnp.ones((Q, 1), bool), srt[:, 1:] != srt[:, :-1]], axis=1)
        ok = (srt < nk) & first
        r = jnp.broadcast_to(jnp.arange(Q, dtype=jnp.int32)[:, None], (Q, L))
        ok &= srt * bk < length
        if a.spec is not None:
            q_lo = r * bq + (0 if off is None else off)
            q_hi = jnp.minimum(r * bq + bq, a.T) - 1 + (0 if off is None else off)
            ok &= jnp.asarray(a.spec.block_visible(q_lo, q_hi, srt * bk, srt * bk + bk - 1))
        c_f, r_f, ok_f = srt.reshape(-1), r.reshape(-1), ok.reshape(-1)
        key = jnp.where(ok_f, c_f, nk)
        order = jnp.argsort(key, stable=True)
        c_s, r_s, ok_s = key[order], r_f[order], ok_f[order]
        n_c = jnp.zeros(nk + 1, jnp.int32).at[key].add(1)[:nk]
        seg_start = jnp.cumsum(n_c) - n_c
        ch_c = (n_c + C - 1) // C
        ch_start = jnp.cumsum(ch_c) - ch_c
        cc = jnp.clip(c_s, 0, nk - 1)
        rank = jnp.arange(Q * L, dtype=jnp.int32) - seg_start[cc]
        chunk = jnp.where(ok_s, ch_start[cc] + rank // C, NC)  # NC: dropped
        rows = jnp.full((NC, C), -1, jnp.int32).at[chunk, rank % C].set(r_s, mode="drop")
        blk = jnp.zeros((NC,), jnp.int32).at[chunk].set(cc, mode="drop")
        # where each list slot's partial result lands (chunk · C + slot; NC · C: none)
        pos_s = jnp.where(ok_s, chunk * C + rank % C, NC * C)
        pos = jnp.zeros((Q * L,), jnp.int32).at[order].set(pos_s).reshape(Q, L)
        return rows, blk, pos

    off = jnp.zeros((a.B,), jnp.int32) if off_B is None else off_B
    per_b = jax.vmap(one, in_axes=(0, 0, None, None))
    return jax.vmap(per_b, in_axes=(0, 0, 0, 0))(idx, cnt, off, lens_B)


def _chunk_scores(a, bq, bk, scale, q_TGH, k_SH, rows_cC, blk_c, off, length, qseg_T, kseg_S):
    """One (b, k)'s chunk scores [c, R, G, bk] (R = C·block_q rows, G heads folded into the
    matmul's rows): (masked, unmasked, q rows [c, R, G, H], rows [c, R] clipped, k_c [c, bk])."""
    c, C = rows_cC.shape
    Tp, G, H = q_TGH.shape
    R = C * bq
    qrow = (rows_cC[:, :, None] * bq + jnp.arange(bq, dtype=jnp.int32)).reshape(c, R)
    ok_row = jnp.repeat(rows_cC >= 0, bq, axis=1) & (qrow < a.T)
    qr = jnp.clip(qrow, 0, Tp - 1)
    k_c = blk_c[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)  # [c, bk]
    q_c = q_TGH[qr]  # [c, R, G, H]
    s = _dot("cxh,csh->cxs", q_c.reshape(c, R * G, H), k_SH[k_c], q_TGH.dtype)
    s = s.reshape(c, R, G, bk) * scale
    if a.logits_soft_cap is not None:
        s = a.logits_soft_cap * jnp.tanh(s / a.logits_soft_cap)
    kp = k_c[:, None, :]
    vis = ok_row[:, :, None] & (kp < length)
    if a.spec is not None:
        qp = qrow[:, :, None] + (0 if off is None else off)
        vis &= a.spec(qp, kp)
    if qseg_T is not None:
        vis &= qseg_T[qr][:, :, None] == kseg_S[jnp.clip(k_c, 0, kseg_S.shape[0] - 1)][:, None]
    sm = jnp.where(vis[:, :, None, :], s, -jnp.inf)
    return sm, s, q_c, qr, k_c


def _dot(spec, x, y, dtype):
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32, precision=precision(dtype))


def _groups(x, cg):
    """[B, K, NC, ...] -> [NG, B, K, cg, ...] (NC padded with empty chunks)."""
    B, K, NC = x.shape[:3]
    cg = min(cg, NC)
    ng = -(-NC // cg)
    fill = -1 if x.ndim == 4 else 0
    x = jnp.pad(
        x, ((0, 0), (0, 0), (0, ng * cg - NC)) + ((0, 0),) * (x.ndim - 3), constant_values=fill
    )
    x = x.reshape(B, K, ng, cg, *x.shape[3:])
    return jnp.moveaxis(x, 2, 0)


_vmap2 = lambda f, axes: jax.vmap(jax.vmap(f, in_axes=axes), in_axes=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(a, bq, bk, q, k, v, arrays):
    return _forward(a, bq, bk, q, k, v, arrays)[0]


def _per_b(arrays, B):
    """(off [B] or None, lens [B], q segments [B, T] or None, kv segments [B, S] or None)."""
    return arrays["off"], arrays["lens"], arrays.get("qseg"), arrays.get("kseg")


def _bcast(x, B, K):
    return None if x is None else jnp.broadcast_to(x[:, None], (B, K, *x.shape[1:]))


def _merge(parts, pos, fill):
    """Gather the chunk-slot partials [B, K, NC·C, ...] of every list entry pos [B, K, Q, L]
    -> [B, K, Q, L, ...] (``fill`` where an entry has none)."""
    take = lambda x, i: jnp.take(x, i, axis=0, mode="fill", fill_value=fill)
    return jax.vmap(jax.vmap(take))(parts, pos)


def _rows(x_BKQ_bq, Tp):
    """[B, K, Q, bq, ...] -> [B, K, Tp, ...]."""
    B, K, Q, bq = x_BKQ_bq.shape[:4]
    return x_BKQ_bq.reshape(B, K, Q * bq, *x_BKQ_bq.shape[4:])[:, :, :Tp]


def _flat(x):
    """Scan outputs [NG, B, K, cg·C, ...] -> [B, K, NC·C, ...] (chunk-slot order)."""
    return jnp.moveaxis(x, 0, 2).reshape(x.shape[1], x.shape[2], -1, *x.shape[4:])


def _forward(a, bq, bk, q, k, v, arrays):
    """q [B, K, Tp, G, H], k [B, K, Sp, H], v [B, K, Sp, V] -> (o [B, K, Tp, G, V], lse).

    Each chunk's rows yield a partial (lse_p, o_p) normalised over the chunk's kv block; a
    list entry's partial is gathered back by ``pos`` and the L partials of a query block are
    merged by a log-sum-exp (gathers only: XLA:CPU scatters are slow).
    """
    B, K, Tp, G, _ = q.shape
    V = v.shape[-1]
    off, lens, qseg, kseg = _per_b(arrays, B)
    scale = arrays["scale"]

    def one(q, k, v, rows, blk, off, length, qs, ks):
        sm, _, _, _, k_c = _chunk_scores(a, bq, bk, scale, q, k, rows, blk, off, length, qs, ks)
        c, R = sm.shape[:2]
        m = sm.max(-1)  # [c, R, G]
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        p = jnp.exp(sm - m_safe[..., None])
        l = p.sum(-1)
        pv = _dot("cxs,csv->cxv", p.astype(v.dtype).reshape(c, R * G, bk), v[k_c], v.dtype)
        o_p = pv.reshape(c, R, G, V) / jnp.where(l == 0, 1.0, l)[..., None]
        lse_p = jnp.where(l == 0, -jnp.inf, m_safe + jnp.log(jnp.where(l == 0, 1.0, l)))
        # [c, C·bq, G, ...] -> [c·C, bq, G, ...]: one entry per chunk slot
        return lse_p.reshape(-1, bq, G), o_p.reshape(-1, bq, G, V)

    axes = (0, 0, 0, 0, 0, 0, 0, 0 if qseg is not None else None, 0 if kseg is not None else None)
    step_bk = _vmap2(one, axes)
    off_B = jnp.zeros((B,), jnp.int32) if off is None else off
    per_b = [_bcast(x, B, K) for x in (off_B, lens, qseg, kseg)]

    def step(_, grp):
        rows, blk = grp
        return None, step_bk(q, k, v, rows, blk, *per_b)

    _, (lse_p, o_p) = jax.lax.scan(step, None, (arrays["rows"], arrays["blk"]))
    lse_e = _merge(_flat(lse_p), arrays["pos"], -jnp.inf)  # [B, K, Q, L, bq, G]
    o_e = _merge(_flat(o_p), arrays["pos"], 0.0)  # [B, K, Q, L, bq, G, V]
    mx = lse_e.max(3, keepdims=True)
    mx = jnp.where(jnp.isneginf(mx), 0.0, mx)
    w = jnp.exp(lse_e - mx)
    tot = w.sum(3)
    lse = jnp.where(tot == 0, -jnp.inf, mx[:, :, :, 0] + jnp.log(jnp.where(tot == 0, 1.0, tot)))
    o = jnp.einsum("bkqlrg,bkqlrgv->bkqrgv", w, o_e) / jnp.where(tot == 0, 1.0, tot)[..., None]
    o, lse = _rows(o, Tp).astype(q.dtype), _rows(lse, Tp)
    return (o, lse), (q, k, v, o, lse, arrays)


def _backward(a, bq, bk, res, cts):
    q, k, v, o, lse, arrays = res
    do, dlse = cts
    B, K, Tp, G, H = q.shape
    off, lens, qseg, kseg = _per_b(arrays, B)
    scale = arrays["scale"]
    d = jnp.einsum("bktgv,bktgv->bktg", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    lse0 = jnp.where(jnp.isinf(lse), 0.0, lse)
    cap = a.logits_soft_cap

    def one(q, k, v, do, lse, d, rows, blk, off, length, qs, ks, carry):
        dk, dv = carry
        sm, s, q_c, qr, k_c = _chunk_scores(a, bq, bk, scale, q, k, rows, blk, off, length, qs, ks)
        c, R = sm.shape[:2]
        x = R * G
        p = jnp.exp(sm - lse[qr][..., None])  # [c, R, G, bk]
        do_c = do[qr].reshape(c, x, -1)  # [c, R·G, V]
        p2 = p.reshape(c, x, bk)
        dv_c = _dot("cxs,cxv->csv", p2.astype(do.dtype), do_c, do.dtype)
        dp = _dot("cxv,csv->cxs", do_c, v[k_c], do.dtype).reshape(c, R, G, bk)
        # masked entries: exactly 0 (an unlisted block read by an empty chunk may hold NaN)
        ds = jnp.where(jnp.isneginf(sm), 0.0, p * (dp - d[qr][..., None]))
        if cap is not None:  # d/dx cap·tanh(x/cap) = 1 − tanh², from the unmasked logits
            ds = ds * (1.0 - jnp.square(s / cap))
        ds = (ds * scale).astype(q.dtype).reshape(c, x, bk)
        dq_c = _dot("cxs,csh->cxh", ds, k[k_c], q.dtype)
        dk_c = _dot("cxs,cxh->csh", ds, q_c.reshape(c, x, H), q.dtype)
        dk = dk.at[k_c.reshape(-1)].add(dk_c.reshape(-1, H))
        dv = dv.at[k_c.reshape(-1)].add(dv_c.reshape(-1, dv.shape[-1]))
        return (dk, dv), dq_c.reshape(-1, bq, G, H)

    axes = (0,) * 10 + (0 if qseg is not None else None, 0 if kseg is not None else None, 0)
    step_bk = _vmap2(one, axes)
    off_B = jnp.zeros((B,), jnp.int32) if off is None else off
    per_b = [_bcast(x, B, K) for x in (off_B, lens, qseg, kseg)]

    def step(carry, grp):
        rows, blk = grp
        return step_bk(q, k, v, do, lse0, d, rows, blk, *per_b, carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq_p = jax.lax.scan(step, init, (arrays["rows"], arrays["blk"]))
    dq = _rows(_merge(_flat(dq_p), arrays["pos"], 0.0).sum(3), Tp)
    none = jax.tree.map(lambda _: None, arrays)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), none


_attention.defvjp(_forward, _backward)


def kv_major_attention(a: AttentionArgs, q_BTNH, k_BSKH, v_BSKV, return_lse: bool = False):
    """Attention under one visit list in the FSA loop order (module docstring).

    Args:
      a: the validated call (``unsupported(a)`` must be None).
      q_BTNH, k_BSKH, v_BSKV: inputs (K_v = K).
      return_lse: also return lse_BNT (float32, -inf for rows that see no key).

    Returns:
      o_BTNV in q's dtype (and lse_BNT).
    """
    vis = a.visits[0]
    bq, bk = vis.block_q, vis.block_kv
    B, K, G = a.B, a.K, a.G
    Tp, Sp = -(-a.T // bq) * bq, -(-a.S // bk) * bk
    C = max(1, _ROWS_PER_CHUNK // bq)
    off, lens = _positions(a)
    rows, blk, pos = chunk_tables(a, C, off, lens)
    cg = max(1, _GROUP_FLOATS // (B * K * G * C * bq * bk))
    arrays = {
        "scale": jnp.asarray(a.scale, jnp.float32),
        "off": off,
        "lens": lens,
        "rows": _groups(rows, cg),
        "blk": _groups(blk, cg),
        "pos": pos,
    }
    if a.q_segment_ids is not None:
        arrays["qseg"] = jnp.pad(a.q_segment_ids, ((0, 0), (0, Tp - a.T)))
        arrays["kseg"] = a.kv_segment_ids
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    q = pad(q_BTNH, Tp).reshape(B, Tp, K, G, a.H).transpose(0, 2, 1, 3, 4)  # [B, K, Tp, G, H]
    k = pad(k_BSKH, Sp).transpose(0, 2, 1, 3)
    v = pad(v_BSKV, Sp).transpose(0, 2, 1, 3)
    static = _static(a)
    o, lse = _attention(static, bq, bk, q, k, v, arrays)
    o = o[:, :, : a.T].transpose(0, 2, 1, 3, 4).reshape(B, a.T, a.N, a.V)
    lse = lse[:, :, : a.T].transpose(0, 1, 3, 2).reshape(B, a.N, a.T)
    return (o, lse) if return_lse else o


def _static(a: AttentionArgs) -> AttentionArgs:
    """The call without its arrays (they travel in ``arrays``, the scale among them)."""
    return dataclasses.replace(
        a,
        scale=1.0,
        q_segment_ids=None,
        kv_segment_ids=None,
        q_offset=None,
        kv_lengths=None,
        visits=(),
    )
