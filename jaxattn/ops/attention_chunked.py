"""Memory-efficient pure-XLA attention: ``implementation="chunked"``.

Online softmax (FlashAttention's recurrence) over kv blocks, in plain XLA:

  m ← max(m, rowmax(s)),  l ← l·e^{m_old − m} + rowsum(e^{s − m}),
  acc ← acc·e^{m_old − m} + e^{s − m} v

and a custom VJP that recomputes the probabilities from the saved log-sum-exp instead of
storing the T×S matrix (FlashAttention-2's backward, one pass over q blocks that accumulates
dk/dv in place). Temporary memory is O(T·block) rather than O(T·S).

Skipping: before the loops, a table says which kv blocks each q block can see (from the mask
spec's ``block_visible``, kv_lengths, the dense mask's block reduction and segment-id ranges).
Each q block loops only over its visible kv blocks (a data-dependent trip count), so blocks
the mask rules out cost nothing: the causal upper triangle is never computed. Blocks the spec
marks as full skip the elementwise mask (a lax.cond: it pays inside the loops, 175 vs 228 ms
fwd+bwd at T = 2048 causal on CPU).

Layout: q, k, v are transposed once to head-major q [B, K, G, T, H], k [B, K, S, H],
v [B, K, S, V], so every block product is one batched matmul per (b, k) over the G·bq query
rows of a kv group; in the input layout XLA transposes the operands of every einsum. Measured
on 2 CPU cores, fp32, T = 4096 causal (B 1, N 8, K 2, H 128): fwd 0.36 -> 0.28 s, fwd+bwd
1.36 -> 1.00 s. One case measured slower: one q block over several kv blocks without GQA,
forward only (B 4, T 200, S 1024, N = K = 8: 22 -> 34 ms; fwd+bwd 89 -> 96 ms), where the
transposed k and v are read once, so their copies are not paid back.

One block: when the static block count of an axis is 1 (T <= block_q or S <= block_kv) the
loop over it is not built: no lax.map/scan over one q block, no fori_loop, block table or
lax.cond for one kv block (the body runs once and masks elementwise; an invisible block is
then fully masked, which gives what skipping it would: zeros, lse -inf, zero gradients).
A call that fits in one block is then a few fused ops around its batched matmuls, faster
than the autodiffed "xla" reference (numbers in ``attention._choose``). Saving the
probabilities as a residual instead of recomputing them in the backward measured no faster
for one block (14.4 vs 14.4 ms fwd+bwd at B 16, T 128, N 4, H 48), so it is not done.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxattn.ops._attention_args import AttentionArgs, scores_fp32, visible

__all__ = ["ChunkedBlockSizes", "chunked_attention"]

_ARRAY_FIELDS = ("dense", "q_segment_ids", "kv_segment_ids", "q_offset", "kv_lengths")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkedBlockSizes:
    """Block sizes of the chunked implementation (queries and keys per block).

    ``for_backend`` gives the defaults: 256 × 256 on CPU (fastest wall time measured for fp32
    fwd+bwd at T = 4096 on 2 cores: 1.89 s vs 2.61 s at 128 and 2.49 s at 512; finer blocks skip
    more of the causal triangle, coarser ones give XLA's threads bigger ops), 512 × 512 on
    accelerators, where each loop iteration carries a fixed launch overhead.
    """

    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ChunkedBlockSizes.{name} must be a positive int, got {value!r}")

    @classmethod
    def for_backend(cls, backend: str | None = None) -> ChunkedBlockSizes:
        """The default block sizes for ``backend`` (default: jax's default backend)."""
        backend = backend or jax.default_backend()
        return cls(block_q=256, block_kv=256) if backend == "cpu" else cls()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block_tables(a: AttentionArgs, bq: int, bk: int, nq: int, nk: int):
    """idx [nq, nk] (visible kv blocks first, in order), cnt [nq], full [nq, nk]."""
    qb = jnp.arange(nq, dtype=jnp.int32)[:, None]
    kb = jnp.arange(nk, dtype=jnp.int32)[None, :]
    q_lo_i, q_hi_i = qb * bq, jnp.minimum(qb * bq + bq - 1, a.T - 1)
    k_lo, k_hi = kb * bk, jnp.minimum(kb * bk + bk - 1, a.S - 1)
    off = jnp.zeros((), jnp.int32) if a.q_offset is None else jnp.asarray(a.q_offset, jnp.int32)
    q_lo, q_hi = q_lo_i + jnp.min(off), q_hi_i + jnp.max(off)
    vis = jnp.ones((nq, nk), bool)
    full = jnp.broadcast_to(kb * bk + bk <= a.S, (nq, nk))
    if a.spec is not None:
        vis &= a.spec.block_visible(q_lo, q_hi, k_lo, k_hi)
        # full needs every query offset to agree: use the exact range of each row only when
        # the offset is one scalar
        exact = off.ndim == 0
        full &= a.spec.block_full(q_lo, q_hi, k_lo, k_hi) & exact
    if a.kv_lengths is not None:
        vis &= k_lo < jnp.max(a.kv_lengths)
        full &= k_hi < jnp.min(a.kv_lengths)
    if a.dense is not None:
        b, n = a.dense.shape[:2]
        d = jnp.pad(a.dense, ((0, 0), (0, 0), (0, nq * bq - a.T), (0, nk * bk - a.S)))
        vis &= d.reshape(b, n, nq, bq, nk, bk).any(axis=(0, 1, 3, 5))
        full = jnp.zeros_like(full)
    if a.q_segment_ids is not None:

        def ranges(seg, n_blocks, block):
            seg = jnp.pad(seg, ((0, 0), (0, n_blocks * block - seg.shape[1])), mode="edge")
            seg = seg.reshape(seg.shape[0], n_blocks, block)
            return seg.min(-1), seg.max(-1)

        qmin, qmax = ranges(a.q_segment_ids, nq, bq)
        kmin, kmax = ranges(a.kv_segment_ids, nk, bk)
        overlap = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
        vis &= overlap.any(axis=0)
        full = jnp.zeros_like(full)
    idx = jnp.argsort(~vis, axis=1, stable=True).astype(jnp.int32)
    cnt = vis.sum(axis=1).astype(jnp.int32)
    return idx, cnt, full & vis


def _masked_scores(a, bq, bk, q_blk, k_blk, qb, kb, full, dense):
    """Scores of one block, -inf where masked; returns (masked scores, unmasked scores).

    ``full`` is the block's traced "no element masked" flag from the block table, or None
    (a lone kv block, which has no table) to mask elementwise without a branch.
    """
    B, K, G, T, _ = q_blk.shape
    s = scores_fp32(a, _fold(q_blk), k_blk, "bkrh,bksh->bkrs").reshape(B, K, G, T, -1)

    def apply_mask(s):
        dense_blk = None
        if dense is not None:
            dense_blk = jax.lax.dynamic_slice(
                dense, (0, 0, qb * bq, kb * bk), (*dense.shape[:2], bq, bk)
            )
        q_idx = qb * bq + jnp.arange(bq, dtype=jnp.int32)
        k_idx = kb * bk + jnp.arange(bk, dtype=jnp.int32)
        return jnp.where(visible(a, q_idx, k_idx, dense_blk), s, -jnp.inf)

    if full is None:
        return apply_mask(s), s
    return jax.lax.cond(full, lambda s: s, apply_mask, s), s


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _fold(x):
    """[B, K, G, t, ...] -> [B, K, G·t, ...] (a free reshape): the G query heads of a kv
    group become rows of one matmul. Keeping G as its own axis made XLA:CPU lay out the
    common G = 1 (MLA, MHA) with the unit axis in the middle and materialise transposing
    copies of every [B, K, 1, t, s] probability block (measured on the MLA training step)."""
    return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])


def _dot(spec, x, y):
    """``einsum(spec, x, y)`` in fp32, with operands and result laid out "bkgt..." folded to
    rows "bkr..." for the matmul (see ``_fold``)."""
    ins, out = spec.split("->")
    specs, args = [], []
    for sub, arg in zip(ins.split(","), (x, y)):
        if sub.startswith("bkgt"):
            sub, G, t, arg = "bkr" + sub[4:], arg.shape[2], arg.shape[3], _fold(arg)
        specs.append(sub)
        args.append(arg)
    fold_out = out.startswith("bkgt")
    r = jnp.einsum(
        f"{','.join(specs)}->{'bkr' + out[4:] if fold_out else out}",
        *args,
        preferred_element_type=jnp.float32,
        precision=_precision(x.dtype),
    )
    return r.reshape(r.shape[0], r.shape[1], G, t, *r.shape[3:]) if fold_out else r


def _over_kv_blocks(nk, tables, qb, body, carry):
    """carry = body(kb, full, carry) for each kv block q block ``qb`` sees.

    One kv block (nk == 1): the body runs once, without a loop or a lax.cond. If the table
    would have ruled the block out, its elementwise mask hides every key, which gives the
    same result as not running it (m = -inf, l = 0: zeros, lse = -inf, zero gradients).
    """
    if nk == 1:
        return body(0, None, carry)
    idx, cnt, full = tables

    def step(i, carry):
        kb = idx[qb, i]
        return body(kb, full[qb, kb], carry)

    return jax.lax.fori_loop(0, cnt[qb], step, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(a, bq, bk, q, k, v, arrays, tables):
    return _forward(a, bq, bk, q, k, v, arrays, tables)[0]


def _forward(a, bq, bk, q, k, v, arrays, tables):
    """q [B, K, G, Tp, H], k [B, K, Sp, H], v [B, K, Sp, V] -> o [B, K, G, Tp, V], lse."""
    a = dataclasses.replace(a, **arrays)
    B, K, G, Tp, _ = q.shape
    V, nq, nk = v.shape[-1], Tp // bq, k.shape[2] // bk
    dense = _pad_dense(a, Tp, k.shape[2])

    def q_block(qb):
        q_blk = _slice(q, qb * bq, bq, 3)

        def body(kb, full, carry):
            k_blk, v_blk = _slice(k, kb * bk, bk, 2), _slice(v, kb * bk, bk, 2)
            s, _ = _masked_scores(a, bq, bk, q_blk, k_blk, qb, kb, full, dense)
            m_new = s.max(-1) if carry is None else jnp.maximum(carry[0], s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all masked so far: exp(-inf)=0
            p = jnp.exp(s - m_safe[..., None])
            pv = _dot("bkgts,bksv->bkgtv", p.astype(v.dtype), v_blk)
            if carry is None:  # the first block: nothing to rescale
                return m_new, p.sum(-1), pv
            m, l, acc = carry
            alpha = jnp.exp(m - m_safe)
            return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

        init = None
        if nk > 1:
            init = (
                jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
                jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, V), jnp.float32),
            )
        m, l, acc = _over_kv_blocks(nk, tables, qb, body, init)
        o = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
        return o.astype(q.dtype), lse

    if nq == 1:
        o, lse = q_block(0)
    else:
        o, lse = jax.lax.map(q_block, jnp.arange(nq, dtype=jnp.int32))
        # o [nq, B, K, G, bq, V] -> [B, K, G, Tp, V];  lse [nq, B, K, G, bq] -> [B, K, G, Tp]
        o = o.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, Tp, V)
        lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, K, G, Tp)
    return (o, lse), (q, k, v, o, lse, arrays, tables)


def _pad_dense(a, Tp, Sp):
    if a.dense is None:
        return None
    return jnp.pad(a.dense, ((0, 0), (0, 0), (0, Tp - a.T), (0, Sp - a.S)))


def _backward(a, bq, bk, res, cts):
    q, k, v, o, lse, arrays, tables = res
    do, dlse = cts
    a = dataclasses.replace(a, **arrays)
    B, K, G, Tp, H = q.shape
    nq, nk = Tp // bq, k.shape[2] // bk
    dense = _pad_dense(a, Tp, k.shape[2])
    # D = rowsum(dO ∘ O) − dlse: the softmax-Jacobian term, with the lse cotangent folded in
    d = jnp.einsum("bkgtv,bkgtv->bkgt", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    lse = jnp.where(jnp.isinf(lse), 0.0, lse)
    cap = a.logits_soft_cap

    def q_block(carry, qb):
        q_blk, do_blk = _slice(q, qb * bq, bq, 3), _slice(do, qb * bq, bq, 3)
        lse_blk, d_blk = _slice(lse, qb * bq, bq, 3), _slice(d, qb * bq, bq, 3)

        def body(kb, full, inner):
            dq, dk, dv = inner
            k_blk, v_blk = _slice(k, kb * bk, bk, 2), _slice(v, kb * bk, bk, 2)
            s, s_unmasked = _masked_scores(a, bq, bk, q_blk, k_blk, qb, kb, full, dense)
            p = jnp.exp(s - lse_blk[..., None])
            dv_blk = _dot("bkgts,bkgtv->bksv", p.astype(do.dtype), do_blk)
            dp = _dot("bkgtv,bksv->bkgts", do_blk, v_blk)
            ds = p * (dp - d_blk[..., None])
            if cap is not None:  # d/dx cap·tanh(x/cap) = 1 − tanh², from the unmasked logits
                ds = ds * (1.0 - jnp.square(s_unmasked / cap))
            ds = (ds * a.scale).astype(q.dtype)
            dq = dq + _dot("bkgts,bksh->bkgth", ds, k_blk)
            dk_blk = _dot("bkgts,bkgth->bksh", ds, q_blk)
            if nk == 1:  # the block is all of dk and dv
                return dq, dk + dk_blk, dv + dv_blk
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, _slice(dk, kb * bk, bk, 2) + dk_blk, kb * bk, axis=2
            )
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, _slice(dv, kb * bk, bk, 2) + dv_blk, kb * bk, axis=2
            )
            return dq, dk, dv

        dq0 = jnp.zeros((B, K, G, bq, H), jnp.float32)
        dq, dk, dv = _over_kv_blocks(nk, tables, qb, body, (dq0, *carry))
        return (dk, dv), dq

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if nq == 1:
        (dk, dv), dq = q_block(init, 0)
    else:
        (dk, dv), dq = jax.lax.scan(q_block, init, jnp.arange(nq, dtype=jnp.int32))
        dq = dq.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, Tp, H)
    none = jax.tree.map(lambda _: None, (arrays, tables))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *none)


_attention.defvjp(_forward, _backward)


def chunked_attention(
    a: AttentionArgs,
    q_BTNH,
    k_BSKH,
    v_BSKV,
    return_lse: bool = False,
    block_sizes: ChunkedBlockSizes | None = None,
):
    """Memory-efficient attention with block skipping.

    Args:
      a: the validated call (see ``check_args``).
      q_BTNH, k_BSKH, v_BSKV: inputs, one floating dtype.
      return_lse: also return lse_BNT (float32, -inf for rows that see no key).
      block_sizes: queries/keys per block; blocks shrink to T or S when those are smaller.

    Returns:
      o_BTNV in q's dtype (and lse_BNT). Lengths that are not block multiples are padded and
      the padding masked; rows that see no key give zeros and zero gradients.
    """
    bs = block_sizes or ChunkedBlockSizes.for_backend()
    bq, bk = min(bs.block_q, a.T), min(bs.block_kv, a.S)
    Tp, Sp = _round_up(a.T, bq), _round_up(a.S, bk)
    B, K, G = a.B, a.K, a.G
    # head-major layout, once: each (b, k) block product is one batched matmul over the G·bq
    # rows of a group (XLA would otherwise transpose the operands of every einsum)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    q_BKGTH = pad(q_BTNH, Tp).reshape(B, Tp, K, G, a.H).transpose(0, 2, 3, 1, 4)
    k_BKSH = pad(k_BSKH, Sp).transpose(0, 2, 1, 3)
    v_BKSV = pad(v_BSKV, Sp).transpose(0, 2, 1, 3)
    arrays = {f: getattr(a, f) for f in _ARRAY_FIELDS if not _is_static(getattr(a, f))}
    static = dataclasses.replace(a, **{f: None for f in arrays})
    # one kv block: no table (the block is masked elementwise, see _over_kv_blocks)
    tables = _block_tables(a, bq, bk, Tp // bq, Sp // bk) if Sp > bk else None
    o_BKGTV, lse_BKGT = _attention(static, bq, bk, q_BKGTH, k_BKSH, v_BKSV, arrays, tables)
    o = o_BKGTV[:, :, :, : a.T].transpose(0, 3, 1, 2, 4).reshape(B, a.T, a.N, a.V)
    return (o, lse_BKGT[..., : a.T].reshape(B, a.N, a.T)) if return_lse else o


def _is_static(x) -> bool:
    return x is None or isinstance(x, int)


block_tables = _block_tables  # for tests that count visited blocks
