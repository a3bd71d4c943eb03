"""Memory-efficient pure-XLA attention: ``implementation="chunked"``.

Online softmax (FlashAttention's recurrence) over kv blocks, in plain XLA:

  m ← max(m, rowmax(s)),  l ← l·e^{m_old − m} + rowsum(e^{s − m}),
  acc ← acc·e^{m_old − m} + e^{s − m} v

and a custom VJP that recomputes the probabilities from the saved log-sum-exp instead of
storing the T×S matrix (FlashAttention-2's backward, one pass over q blocks that accumulates
dk/dv in place). Temporary memory is O(T·block) rather than O(T·S).

Skipping: before the loops, the visit tables of ``pallas_kernels.block_tables`` say which kv
blocks each q block can see (mask spec block views, kv_lengths, the dense mask's block
reduction, segment-id ranges, and block-visit lists). Each q block loops only over its visible
kv blocks (a data-dependent trip count), so blocks the mask rules out cost nothing: the causal
upper triangle is never computed. Blocks flagged full skip the elementwise mask (a lax.cond:
it pays inside the loops, 175 vs 228 ms fwd+bwd at T = 2048 causal on CPU).

Block-visit lists (per batch row and kv head) make the tables per row: step i of q block r
then gathers, for every (batch row, kv head), the i-th listed kv block (the trip count is the
longest list of the q block; shorter lists are masked in their extra steps) and the backward
scatter-adds dk/dv into the listed blocks. Only listed blocks are ever read. The block sizes
follow the lists' (they must nest inside them).

Layout: q, k, v are transposed once to head-major q [B, K, G, T, H], k [B, K, S, H],
v [B, K_v, S, V], so every block product is one batched matmul per (b, k) over the G·bq query
rows of a kv group; in the input layout XLA transposes the operands of every einsum. Measured
on 2 CPU cores, fp32, T = 4096 causal (B 1, N 8, K 2, H 128): fwd 0.36 -> 0.28 s, fwd+bwd
1.36 -> 1.00 s. One case measured slower: one q block over several kv blocks without GQA,
forward only (B 4, T 200, S 1024, N = K = 8: 22 -> 34 ms; fwd+bwd 89 -> 96 ms), where the
transposed k and v are read once, so their copies are not paid back. With K_v != K value
heads the probabilities of a block are regrouped by value heads (a reshape) for the products
with v.

One block: when the static block count of an axis is 1 (T <= block_q or S <= block_kv) the
loop over it is not built: no lax.map/scan over one q block, no fori_loop, block table or
lax.cond for one kv block (the body runs once and masks elementwise; an invisible block is
then fully masked, which gives what skipping it would: zeros, lse -inf, zero gradients).
A call that fits in one block is then a few fused ops around its batched matmuls, faster
than the autodiffed "xla" reference (numbers in ``attention._choose``). Saving the
probabilities as a residual instead of recomputing them in the backward measured no faster
for one block (14.4 vs 14.4 ms fwd+bwd at B 16, T 128, N 4, H 48), so it is not done.

Dropout multiplies each block's probabilities by the keep-mask of ``dropout_keep`` (a
function of batch row, head, query row and key only), recomputed in the backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxattn.ops import _visits_kv_major as kv_major
from jaxattn.ops._attention_args import AttentionArgs
from jaxattn.ops._attention_math import (
    dropout_keep,
    gather_columns,
    regroup,
    scores_fp32,
    split_arrays,
    visible,
)
from jaxattn.ops._chunked_blocks import Blocks, _dot, _fold, _slice
from pallas_kernels import block_tables

__all__ = ["ChunkedBlockSizes", "chunked_attention", "tables_for"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkedBlockSizes:
    """Block sizes of the chunked implementation (queries and keys per block).

    ``for_backend`` gives the defaults: 256 × 256 on CPU (fastest wall time measured for fp32
    fwd+bwd at T = 4096 on 2 cores: 1.89 s vs 2.61 s at 128 and 2.49 s at 512; finer blocks skip
    more of the causal triangle, coarser ones give XLA's threads bigger ops), 512 × 512 on
    accelerators, where each loop iteration carries a fixed launch overhead. With block-visit
    lists the default is the lists' block sizes.

    ``loop_order`` orders the loops under block-visit lists: "q" walks each query block's
    list (blocks ``block_q`` x ``block_kv``); "kv" is Flash Sparse Attention's order
    (``jaxattn.ops._visits_kv_major``: the listed pairs sorted by kv block, the queries that
    chose a block batched into one matmul; it runs on the lists' own blocks, so ``block_q`` /
    ``block_kv`` are unused); "auto" takes "kv" for lists with query blocks of at most
    ``KV_MAJOR_MAX_BLOCK_Q`` rows (per-token lists, whose "q" loop runs T / block_q steps of
    tiny matmuls) when it can serve the call and no block sizes were passed, else "q".
    """

    block_q: int = 512
    block_kv: int = 512
    loop_order: str = "auto"

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ChunkedBlockSizes.{name} must be a positive int, got {value!r}")
        if self.loop_order not in ("auto", "q", "kv"):
            raise ValueError(
                f"ChunkedBlockSizes.loop_order must be 'auto', 'q' or 'kv', got {self.loop_order!r}"
            )

    @classmethod
    def for_backend(cls, backend: str | None = None) -> ChunkedBlockSizes:
        """The default block sizes for ``backend`` (default: jax's default backend)."""
        backend = backend or jax.default_backend()
        return cls(block_q=256, block_kv=256) if backend == "cpu" else cls()


KV_MAJOR_MAX_BLOCK_Q = 8


def _kv_major(a: AttentionArgs, bs: ChunkedBlockSizes | None) -> bool:
    """Whether this call runs in the kv-major loop order (``ChunkedBlockSizes.loop_order``).

    Raises:
      NotImplementedError: loop_order="kv" for a call it cannot serve (says why).
    """
    order = "auto" if bs is None else bs.loop_order
    if not a.visits or order == "q":
        return False
    reason = kv_major.unsupported(a)
    if order == "kv":
        if reason:
            raise NotImplementedError(
                f"implementation='chunked' with loop_order='kv' cannot serve this call: {reason}"
            )
        return True
    return bs is None and reason is None and a.visits[0].block_q <= KV_MAJOR_MAX_BLOCK_Q


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def block_sizes_for(a: AttentionArgs, bs: ChunkedBlockSizes | None) -> tuple[int, int]:
    """Effective (block_q, block_kv): shrunk to T and S; with visit lists, nested in theirs.

    Raises:
      ValueError: explicit block sizes that do not nest inside the visit lists' blocks.
    """
    if bs is None and a.visits:
        bq = functools.reduce(math.gcd, (v.block_q for v in a.visits))
        bk = functools.reduce(math.gcd, (v.block_kv for v in a.visits))
    else:
        bs = bs or ChunkedBlockSizes.for_backend()
        bq, bk = bs.block_q, bs.block_kv
    bq, bk = min(bq, a.T), min(bk, a.S)
    for v in a.visits:
        if not (block_tables.nests(a.T, bq, v.block_q) and block_tables.nests(a.S, bk, v.block_kv)):
            raise ValueError(
                f"'chunked' blocks (block_q={bq}, block_kv={bk}) must nest inside the visit "
                f"lists' blocks (block_q={v.block_q}, block_kv={v.block_kv}): pass "
                "ChunkedBlockSizes that divide them, or leave block_sizes unset"
            )
    return bq, bk


def tables_for(a: AttentionArgs, bq: int, bk: int) -> block_tables.Tables:
    """The visit tables of this call at blocks (bq, bk): shared by the batch unless the visit
    lists are per batch row or kv head."""
    segments = None if a.q_segment_ids is None else (a.q_segment_ids, a.kv_segment_ids)
    return block_tables.build(
        a.spec,
        q_len=a.T,
        kv_len=a.S,
        block_q=bq,
        block_kv=bk,
        q_offset=0 if a.q_offset is None else a.q_offset,
        kv_lengths=a.kv_lengths,
        segment_ids=segments,
        dense=a.dense,
        visits=a.visits,
    )


def _masked_scores(a, bq, blocks, q_blk, k_blk, qb, kb, full, valid, dense):
    """Scores of one block, -inf where masked; returns (masked scores, unmasked scores).

    ``full`` is the block's traced "no element masked" flag from the tables, or None (a lone
    kv block, which has no table) to mask elementwise without a branch; ``valid`` [Rb, Rk]
    (per-row tables) is False for rows whose list is shorter than this step.
    """
    B, K, G, T, _ = q_blk.shape
    s = scores_fp32(a, _fold(q_blk), k_blk, "bkrh,bksh->bkrs").reshape(B, K, G, T, -1)

    def apply_mask(s):
        q_idx = qb * bq + jnp.arange(bq, dtype=jnp.int32)
        k_idx = blocks.k_idx(kb)
        dense_blk = None
        if dense is not None:
            rows = _slice(dense, qb * bq, bq, 2)
            if blocks.per_row:
                dense_blk = gather_columns(rows, k_idx, a.K)
            else:
                dense_blk = _slice(rows, kb * blocks.bk, blocks.bk, 3)
        extra = None if valid is None else valid[:, :, None, None, None]
        return jnp.where(visible(a, q_idx, k_idx, dense_blk, extra), s, -jnp.inf)

    if full is None:
        return apply_mask(s), s
    return jax.lax.cond(full, lambda s: s, apply_mask, s), s


def _dropped(a, p, bq, blocks, qb, kb):
    """(p with dropped entries zeroed and kept ones scaled by 1 / (1 - rate), keep scale)."""
    if not a.dropout_rate:
        return p, None
    q_idx = qb * bq + jnp.arange(bq, dtype=jnp.int32)
    z = jnp.where(dropout_keep(a, q_idx, blocks.k_idx(kb)), 1.0 / (1.0 - a.dropout_rate), 0.0)
    return p * z, z


def _over_kv_blocks(tables, qb, body, carry):
    """carry = body(kb, full, valid, carry) for each kv block q block ``qb`` visits.

    No tables (one kv block, no lists): the body runs once, without a loop or a lax.cond; if
    the block is invisible its elementwise mask hides every key, which gives the same result
    as not running it (m = -inf, l = 0: zeros, lse = -inf, zero gradients).
    """
    if tables is None:
        return body(0, None, None, carry)
    idx, cnt, flg = (x[:, :, qb] for x in (tables.index, tables.count, tables.flags))
    full = (flg & block_tables.FULL_BIT) != 0
    if tables.shape[:2] == (1, 1):
        step = lambda i, c: body(idx[0, 0, i], full[0, 0, i], None, c)
        return jax.lax.fori_loop(0, cnt[0, 0], step, carry)

    def step(i, c):
        valid = i < cnt  # rows whose list is shorter than i + 1 are masked at this step
        return body(idx[:, :, i], jnp.all(valid & full[:, :, i]), valid, c)

    return jax.lax.fori_loop(0, jnp.max(cnt), step, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(a, bq, bk, q, k, v, arrays, tables):
    return _forward(a, bq, bk, q, k, v, arrays, tables)[0]


def _forward(a, bq, bk, q, k, v, arrays, tables):
    """q [B, K, G, Tp, H], k [B, K, Sp, H], v [B, K_v, Sp, V] -> o [B, K, G, Tp, V], lse."""
    a = dataclasses.replace(a, **arrays)
    B, K, G, Tp, _ = q.shape
    V, nq = v.shape[-1], Tp // bq
    dense = _pad_dense(a, Tp, k.shape[2])
    blocks = Blocks(a, bk, k, v, tables)

    def q_block(qb):
        q_blk = _slice(q, qb * bq, bq, 3)

        def body(kb, full, valid, carry):
            k_blk, v_blk = blocks.read(k, v, kb, valid)
            s, _ = _masked_scores(a, bq, blocks, q_blk, k_blk, qb, kb, full, valid, dense)
            m_new = s.max(-1) if carry is None else jnp.maximum(carry[0], s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all masked so far: exp(-inf)=0
            p = jnp.exp(s - m_safe[..., None])
            pd, _ = _dropped(a, p, bq, blocks, qb, kb)
            pv = regroup(_dot("bkgts,bksv->bkgtv", regroup(pd.astype(v.dtype), blocks.P), v_blk), K)
            if carry is None:  # the first block: nothing to rescale
                return m_new, p.sum(-1), pv
            m, l, acc = carry
            alpha = jnp.exp(m - m_safe)
            return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

        init = None
        if tables is not None:
            init = (
                jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
                jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, V), jnp.float32),
            )
        m, l, acc = _over_kv_blocks(tables, qb, body, init)
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
    nq = Tp // bq
    dense = _pad_dense(a, Tp, k.shape[2])
    blocks = Blocks(a, bk, k, v, tables)
    # D = rowsum(dO ∘ O) − dlse: the softmax-Jacobian term, with the lse cotangent folded in
    # (with dropout O holds the dropped probabilities, so D = rowsum(P ∘ dP) still holds)
    d = jnp.einsum("bkgtv,bkgtv->bkgt", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    lse = jnp.where(jnp.isinf(lse), 0.0, lse)
    cap = a.logits_soft_cap

    def q_block(carry, qb):
        q_blk, do_blk = _slice(q, qb * bq, bq, 3), _slice(do, qb * bq, bq, 3)
        lse_blk, d_blk = _slice(lse, qb * bq, bq, 3), _slice(d, qb * bq, bq, 3)
        do_p = regroup(do_blk, blocks.P)

        def body(kb, full, valid, inner):
            dq, dk, dv = inner
            k_blk, v_blk = blocks.read(k, v, kb, valid)
            s, s_unmasked = _masked_scores(a, bq, blocks, q_blk, k_blk, qb, kb, full, valid, dense)
            p = jnp.exp(s - lse_blk[..., None])
            pd, z = _dropped(a, p, bq, blocks, qb, kb)
            dv_blk = _dot("bkgts,bkgtv->bksv", regroup(pd.astype(do.dtype), blocks.P), do_p)
            dp = regroup(_dot("bkgtv,bksv->bkgts", do_p, v_blk), K)
            if z is not None:  # dropped entries carry no gradient, kept ones the same scale
                dp = dp * z
            ds = p * (dp - d_blk[..., None])
            if cap is not None:  # d/dx cap·tanh(x/cap) = 1 − tanh², from the unmasked logits
                ds = ds * (1.0 - jnp.square(s_unmasked / cap))
            ds = (ds * a.scale).astype(q.dtype)
            dq = dq + _dot("bkgts,bksh->bkgth", ds, k_blk)
            dk_blk = _dot("bkgts,bkgth->bksh", ds, q_blk)
            if tables is None:  # the block is all of dk and dv
                return dq, dk + dk_blk, dv + dv_blk
            return (dq, *blocks.add(dk, dv, kb, dk_blk, dv_blk))

        dq0 = jnp.zeros((B, K, G, bq, H), jnp.float32)
        dq, dk, dv = _over_kv_blocks(tables, qb, body, (dq0, *carry))
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
      q_BTNH, k_BSKH, v_BSKV: inputs, one floating dtype; v may have K_v != K heads.
      return_lse: also return lse_BNT (float32, -inf for rows that see no key).
      block_sizes: queries/keys per block; blocks shrink to T and S when those are smaller.
        Default: ``ChunkedBlockSizes.for_backend()``, or the visit lists' block sizes.

    Returns:
      o_BTNV in q's dtype (and lse_BNT). Lengths that are not block multiples are padded and
      the padding masked; rows that see no key give zeros and zero gradients.
    """
    if _kv_major(a, block_sizes):
        return kv_major.kv_major_attention(a, q_BTNH, k_BSKH, v_BSKV, return_lse)
    bq, bk = block_sizes_for(a, block_sizes)
    Tp, Sp = _round_up(a.T, bq), _round_up(a.S, bk)
    B, K, G = a.B, a.K, a.G
    # head-major layout, once: each (b, k) block product is one batched matmul over the G·bq
    # rows of a group (XLA would otherwise transpose the operands of every einsum)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    q_BKGTH = pad(q_BTNH, Tp).reshape(B, Tp, K, G, a.H).transpose(0, 2, 3, 1, 4)
    k_BKSH = pad(k_BSKH, Sp).transpose(0, 2, 1, 3)
    v_BKSV = pad(v_BSKV, Sp).transpose(0, 2, 1, 3)
    static, arrays = split_arrays(a)
    # one kv block and no lists: no table (the block is masked elementwise, _over_kv_blocks)
    tables = tables_for(a, bq, bk) if Sp > bk or a.visits else None
    o_BKGTV, lse_BKGT = _attention(static, bq, bk, q_BKGTH, k_BKSH, v_BKSV, arrays, tables)
    o = o_BKGTV[:, :, :, : a.T].transpose(0, 3, 1, 2, 4).reshape(B, a.T, a.N, a.V)
    return (o, lse_BKGT[..., : a.T].reshape(B, a.N, a.T)) if return_lse else o
