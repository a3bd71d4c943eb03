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

_ROWS_PER_CHUNK = 64  # query rows per chunk (C · block_q): fills the matmul's rows with G = 1
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
    """(rows [B, K, NC, C] query-block ids (-1: empty slot), blk [B, K, NC] kv block per chunk).

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
        return rows, blk

    off = jnp.zeros((a.B,), jnp.int32) if off_B is None else off_B
    per_b = jax.vmap(one, in_axes=(0, 0, None, None))
    return jax.vmap(per_b, in_axes=(0, 0, 0, 0))(idx, cnt, off, lens_B)


def _chunk_scores(a, bq, bk, scale, q_GTH, k_SH, rows_cC, blk_c, off, length, qseg_T, kseg_S):
    """One (b, k)'s chunk scores: (s masked [G, c, R, bk], s unmasked, q rows [c, R] clipped,
    scatter rows [c, R] (T_pad: dropped), k_c [c, bk] key indices)."""
    c, C = rows_cC.shape
    Tp = q_GTH.shape[1]
    qrow = (rows_cC[:, :, None] * bq + jnp.arange(bq, dtype=jnp.int32)).reshape(c, C * bq)
    ok_row = jnp.repeat(rows_cC >= 0, bq, axis=1) & (qrow < a.T)
    qr = jnp.clip(qrow, 0, Tp - 1)
    k_c = blk_c[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)  # [c, bk]
    q_c = q_GTH[:, qr]  # [G, c, R, H]
    k_blk = k_SH[k_c]  # [c, bk, H]
    s = jnp.einsum(
        "gcrh,csh->gcrs",
        q_c,
        k_blk,
        preferred_element_type=jnp.float32,
        precision=precision(q_GTH.dtype),
    )
    s = s * scale
    if a.logits_soft_cap is not None:
        s = a.logits_soft_cap * jnp.tanh(s / a.logits_soft_cap)
    kp = k_c[:, None, :]
    vis = ok_row[:, :, None] & (kp < length)
    if a.spec is not None:
        qp = qrow[:, :, None] + (0 if off is None else off)
        vis &= a.spec(qp, kp)
    if qseg_T is not None:
        vis &= qseg_T[qr][:, :, None] == kseg_S[jnp.clip(k_c, 0, kseg_S.shape[0] - 1)][:, None]
    sm = jnp.where(vis[None], s, -jnp.inf)
    return sm, s, q_c, jnp.where(ok_row, qrow, Tp), k_c


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


def _forward(a, bq, bk, q, k, v, arrays):
    """q [B, K, G, Tp, H], k [B, K, Sp, H], v [B, K, Sp, V] -> (o [B, K, G, Tp, V], lse)."""
    B, K, G, Tp, _ = q.shape
    V = v.shape[-1]
    off, lens, qseg, kseg = _per_b(arrays, B)
    rows_g, blk_g = arrays["rows"], arrays["blk"]

    def one(q, k, v, rows, blk, off, length, qs, ks, carry):
        M, l, acc = carry
        sm, _, _, scat, k_c = _chunk_scores(
            a, bq, bk, arrays["scale"], q, k, rows, blk, off, length, qs, ks
        )
        m = sm.max(-1)  # [G, c, R]
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        p = jnp.exp(sm - m_safe[..., None])
        pv = _dot("gcrs,csv->gcrv", p.astype(v.dtype), v[k_c], v.dtype)
        idx = scat.reshape(-1)
        m_g = jnp.full((G, Tp), -jnp.inf).at[:, idx].max(m.reshape(G, -1), mode="drop")
        M_new = jnp.maximum(M, m_g)
        Ms = jnp.where(M_new == -jnp.inf, 0.0, M_new)
        alpha = jnp.exp(M - Ms)
        w = jnp.exp(m_safe.reshape(G, -1) - Ms[:, jnp.clip(idx, 0, Tp - 1)])
        l = (l * alpha).at[:, idx].add(w * p.sum(-1).reshape(G, -1), mode="drop")
        acc = (
            (acc * alpha[..., None])
            .at[:, idx]
            .add(w[..., None] * pv.reshape(G, -1, V), mode="drop")
        )
        return M_new, l, acc

    axes = (
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0 if qseg is not None else None,
        0 if kseg is not None else None,
        0,
    )
    step_bk = _vmap2(one, axes)
    off_B = jnp.zeros((B,), jnp.int32) if off is None else off
    bcast = lambda x: None if x is None else jnp.broadcast_to(x[:, None], (B, K, *x.shape[1:]))

    def step(carry, grp):
        rows, blk = grp
        return step_bk(
            q, k, v, rows, blk, bcast(off_B), bcast(lens), bcast(qseg), bcast(kseg), carry
        ), None

    init = (
        jnp.full((B, K, G, Tp), -jnp.inf, jnp.float32),
        jnp.zeros((B, K, G, Tp), jnp.float32),
        jnp.zeros((B, K, G, Tp, V), jnp.float32),
    )
    (M, l, acc), _ = jax.lax.scan(step, init, (rows_g, blk_g))
    o = (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(q.dtype)
    lse = jnp.where(l == 0, -jnp.inf, M + jnp.log(jnp.where(l == 0, 1.0, l)))
    return (o, lse), (q, k, v, o, lse, arrays)


def _backward(a, bq, bk, res, cts):
    q, k, v, o, lse, arrays = res
    do, dlse = cts
    B, K, G, Tp, H = q.shape
    off, lens, qseg, kseg = _per_b(arrays, B)
    d = jnp.einsum("bkgtv,bkgtv->bkgt", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    lse0 = jnp.where(jnp.isinf(lse), 0.0, lse)
    cap = a.logits_soft_cap

    def one(q, k, v, do, lse, d, rows, blk, off, length, qs, ks, carry):
        dq, dk, dv = carry
        sm, s, q_c, scat, k_c = _chunk_scores(
            a, bq, bk, arrays["scale"], q, k, rows, blk, off, length, qs, ks
        )
        qr = jnp.clip(scat, 0, Tp - 1)
        p = jnp.exp(sm - lse[:, qr][..., None])  # [G, c, R, bk]
        do_c = do[:, qr]  # [G, c, R, V]
        dv_c = _dot("gcrs,gcrv->csv", p.astype(do.dtype), do_c, do.dtype)
        dp = _dot("gcrv,csv->gcrs", do_c, v[k_c], do.dtype)
        # masked entries: exactly 0 (an unlisted block read by an empty chunk may hold NaN)
        ds = jnp.where(jnp.isneginf(sm), 0.0, p * (dp - d[:, qr][..., None]))
        if cap is not None:  # d/dx cap·tanh(x/cap) = 1 − tanh², from the unmasked logits
            ds = ds * (1.0 - jnp.square(s / cap))
        ds = (ds * arrays["scale"]).astype(q.dtype)
        dq_c = _dot("gcrs,csh->gcrh", ds, k[k_c], q.dtype)
        dk_c = _dot("gcrs,gcrh->csh", ds, q_c, q.dtype)
        idx = scat.reshape(-1)
        dq = dq.at[:, idx].add(dq_c.reshape(G, -1, H), mode="drop")
        dk = dk.at[k_c.reshape(-1)].add(dk_c.reshape(-1, H))
        dv = dv.at[k_c.reshape(-1)].add(dv_c.reshape(-1, dv.shape[-1]))
        return dq, dk, dv

    axes = (0,) * 10 + (0 if qseg is not None else None, 0 if kseg is not None else None, 0)
    step_bk = _vmap2(one, axes)
    off_B = jnp.zeros((B,), jnp.int32) if off is None else off
    bcast = lambda x: None if x is None else jnp.broadcast_to(x[:, None], (B, K, *x.shape[1:]))

    def step(carry, grp):
        rows, blk = grp
        args = (
            q,
            k,
            v,
            do,
            lse0,
            d,
            rows,
            blk,
            bcast(off_B),
            bcast(lens),
            bcast(qseg),
            bcast(kseg),
        )
        return step_bk(*args, carry), None

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.zeros(k.shape, jnp.float32),
        jnp.zeros(v.shape, jnp.float32),
    )
    (dq, dk, dv), _ = jax.lax.scan(step, init, (arrays["rows"], arrays["blk"]))
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
    rows, blk = chunk_tables(a, C, off, lens)
    cg = max(1, _GROUP_FLOATS // (B * K * G * C * bq * bk))
    arrays = {
        "scale": jnp.asarray(a.scale, jnp.float32),
        "off": off,
        "lens": lens,
        "rows": _groups(rows, cg),
        "blk": _groups(blk, cg),
    }
    if a.q_segment_ids is not None:
        arrays["qseg"] = jnp.pad(a.q_segment_ids, ((0, 0), (0, Tp - a.T)))
        arrays["kseg"] = a.kv_segment_ids
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    q = pad(q_BTNH, Tp).reshape(B, Tp, K, G, a.H).transpose(0, 2, 3, 1, 4)
    k = pad(k_BSKH, Sp).transpose(0, 2, 1, 3)
    v = pad(v_BSKV, Sp).transpose(0, 2, 1, 3)
    static = _static(a)
    o, lse = _attention(static, bq, bk, q, k, v, arrays)
    o = o[:, :, :, : a.T].transpose(0, 3, 1, 2, 4).reshape(B, a.T, a.N, a.V)
    return (o, lse[..., : a.T].reshape(B, a.N, a.T)) if return_lse else o


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
