"""MiKV: importance-aware mixed precision per token, behind the cache protocol (PAPERS.md §5).

MiKV (No Token Left Behind) keeps the tokens an eviction policy would drop in low precision
instead of dropping them, and the important ones in high precision. ``MixedPrecisionKVCache``
(``CacheConfig(format="mikv")``, dense layout, policy "full") stores, per sequence:

* every token once it leaves the window of the last R = ``residual`` tokens, as b-bit codes
  (keys and values both per token, one fp16 scale and zero per ``group_size`` channels; the
  ``PackedRows`` of ``jaxattn.cache``): nothing is evicted;
* the R most recent tokens in full precision (``PackedRows``' window; H2O's recent part);
* the S = ``important`` heavy hitters in full precision: ``hi_*_BS..``, a table of the tokens
  with the largest accumulated attention, H2O's importance (the sum over every later query
  and every head of the token's attention probability, ``hi_score_BS`` / ``win_score_BR``).
  Tiers are per token (the score is summed over heads, so a token's keys and values take one
  precision in every head).

The selection is H2O's greedy one: when tokens leave the recent window they compete with the
current table, and the S largest scores (ties: the table first, then the older token) stay
in full precision (``saliency="normalized"``: ZipCache's normalized attention score, each
score divided by the number of queries that attended the token, counted alongside it in
``hi_count_BS`` / ``win_count_BR``); the others are read from their low-precision codes from then on
(demotion is final: the full-precision copy is gone, as an evicted token is in H2O).

Attention reads the low-precision slots block by block (``decode_over_blocks``, the slots held
in the table hidden), the table and the window in full precision, and the new tokens, in one
softmax; the probabilities of the full-precision keys are then recomputed from the same
log-sum-exp to accumulate the scores (the low tier's scores are never needed). With S at
least the capacity every token stays in full precision: the output is the dense cache's up to
float rounding (tested). Not implemented here: MiKV's query/key channel balancer for
low-precision keys, and a quantized (e.g. int8) high tier.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import _num_new, positions_BT, write_rows
from jaxattn.cache._dense import _policy
from jaxattn.cache._packed import PackedRows
from jaxattn.cache._quantized import QuantizedKVCache, _check_sizes, _QuantizedMixin, _rows

__all__ = ["MixedPrecisionKVCache"]


@struct.dataclass
class MixedPrecisionKVCache(_QuantizedMixin):
    """A dense K/V cache with two precision tiers per token (``CacheConfig.format="mikv"``).

    Attributes:
      k, v: every token's keys [B, C, K, H] / values [B, C, K_v, V] as ``PackedRows`` (per
        token) with the full-precision window of the last R tokens.
      hi_k_BSKH, hi_v_BSKV: the S heavy hitters' keys and values in the storage dtype.
      hi_pos_BS: int32 [B, S] their positions (-1: an empty entry).
      hi_score_BS, win_score_BR: float32 accumulated attention of the table's tokens and of
        the window's (position p at slot p % R).
      hi_count_BS, win_count_BR: float32 queries that attended each of them ("normalized"
        saliency; [B, 0] otherwise).
      lengths_B: int32 [B] tokens seen per sequence.
      normalized: static, ZipCache's saliency (``CacheConfig.saliency == "normalized"``).
    """

    k: PackedRows
    v: PackedRows
    hi_k_BSKH: jax.Array
    hi_v_BSKV: jax.Array
    hi_pos_BS: jax.Array
    hi_score_BS: jax.Array
    win_score_BR: jax.Array
    hi_count_BS: jax.Array
    win_count_BR: jax.Array
    lengths_B: jax.Array
    sink: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=0)
    normalized: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls, *, batch, capacity, num_kv_heads, head_dim, v_head_dim=None, num_v_heads=None,
        dtype=jnp.bfloat16, config,
    ) -> MixedPrecisionKVCache:  # fmt: skip
        """An empty cache (arguments as ``KVCache.create``; ``config.format == "mikv"``); the
        table has min(``config.important``, C) entries.

        Raises:
          ValueError: ``config.group_size`` does not divide a head dim, or a bad size (named).
        """
        _check_sizes(batch=batch, capacity=capacity, num_kv_heads=num_kv_heads, head_dim=head_dim)
        _, _, dtype = _policy(config, "mikv", dtype)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
        common = dict(batch=batch, capacity=capacity, dtype=dtype, sink=0, window=0, axis="token")
        k = _rows(config, heads=num_kv_heads, dim=head_dim, what="key", **common)
        v = _rows(config, heads=num_v_heads, dim=v_head_dim, what="value", **common)
        s = min(config.important, k.codes_BCKW.shape[1])
        normalized = config.saliency == "normalized"
        r = config.residual
        return cls(
            k=k,
            v=v,
            hi_k_BSKH=jnp.zeros((batch, s, num_kv_heads, head_dim), dtype),
            hi_v_BSKV=jnp.zeros((batch, s, num_v_heads, v_head_dim), dtype),
            hi_pos_BS=jnp.full((batch, s), -1, jnp.int32),
            hi_score_BS=jnp.zeros((batch, s), jnp.float32),
            win_score_BR=jnp.zeros((batch, r), jnp.float32),
            hi_count_BS=jnp.zeros((batch, s if normalized else 0), jnp.float32),
            win_count_BR=jnp.zeros((batch, r if normalized else 0), jnp.float32),
            lengths_B=jnp.zeros((batch,), jnp.int32),
            normalized=normalized,
        )

    def _rows(self):
        return self.k, self.v

    _check_new = QuantizedKVCache._check_new

    @property
    def important(self) -> int:
        """S, entries of the full-precision table."""
        return self.hi_pos_BS.shape[1]

    def table_bytes(self) -> int:
        """Bytes of one sequence's fixed buffers besides the rows: the table (keys, values,
        int32 positions, fp32 scores) and the window's fp32 scores (and fp32 counts of both
        for the "normalized" saliency)."""
        fp = self.hi_k_BSKH.dtype.itemsize
        s, r = self.important, self.win_score_BR.shape[1]
        row = math.prod(self.hi_k_BSKH.shape[2:]) + math.prod(self.hi_v_BSKV.shape[2:])
        stats = 2 if self.normalized else 1
        return s * (row * fp + 4 + 4 * stats) + r * 4 * stats

    def bytes_per_token(self, context: int | None = None) -> float:
        """Exact storage bytes per token of one sequence.

        Args:
          context: None: a low-precision token's bytes (codes and its scales and zeros), the
            limit at long contexts. An int: every buffer of a cache built for ``context``
            positions (the rows and their windows, the table and the scores) over ``context``.
        """
        if context is None:
            return super().bytes_per_token()
        return super().bytes_per_token(context) + self.table_bytes() / context

    def _hide_BC(self):
        """Quantized slots whose token is read from the table, bool [B, C]."""
        b, c = self.hi_pos_BS.shape[0], self.capacity
        slot_BS = jnp.where(self.hi_pos_BS >= 0, self.hi_pos_BS, c)
        bi = jnp.arange(b)[:, None]
        return jnp.zeros((b, c + 1), bool).at[bi, slot_BS].set(True, mode="drop")[:, :c]

    def _scores(self, q_BTNH, k_new, num_B, lse_BNT, *, mask, scale=None, logits_soft_cap=None):
        """This step's attention probabilities summed over heads and valid queries, for the
        window's, the table's and the new tokens' keys, and the number of valid queries that
        saw each: (([B, R], [B, S], [B, T]), (counts alike))."""
        b, t, n, h = q_BTNH.shape
        n_B = self.lengths_B
        r = self.k.residual
        wpos_BR = self.k.quantized_count(n_B)[:, None] + jnp.arange(r, dtype=jnp.int32)[None]
        wpos_BR = jnp.where(wpos_BR < n_B[:, None], wpos_BR, -1)
        npos_BT = positions_BT(n_B, t)
        kpos_BS = jnp.concatenate([wpos_BR, self.hi_pos_BS, npos_BT], axis=1)
        keys = jnp.concatenate(
            [self.k.window_at(jnp.maximum(wpos_BR, 0)), self.hi_k_BSKH, k_new.astype(self.k.dtype)],
            axis=1,
        ).astype(jnp.float32)
        kh = keys.shape[2]
        q = q_BTNH.astype(self.k.dtype).astype(jnp.float32).reshape(b, t, kh, n // kh, h)
        s = jnp.einsum("btkgh,bskh->bkgts", q, keys) * (h**-0.5 if scale is None else scale)
        if logits_soft_cap:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        qpos, kpos = npos_BT[:, :, None], kpos_BS[:, None, :]
        vis_BTS = (kpos >= 0) & (kpos <= qpos)
        if mask is not None:
            vis_BTS &= mask(qpos, kpos)
        vis_BTS &= (jnp.arange(t)[None, :] < num_B[:, None])[:, :, None]  # padding queries
        lse = lse_BNT.reshape(b, kh, n // kh, t)[..., None]
        p = jnp.where(vis_BTS[:, None, None] & jnp.isfinite(lse), jnp.exp(s - lse), 0.0)
        p_BS, c_BS = p.sum((1, 2, 3)), vis_BTS.sum(1).astype(jnp.float32)
        s_hi = self.important
        split = lambda x: (x[:, :r], x[:, r : r + s_hi], x[:, r + s_hi :])
        return split(p_BS), split(c_BS)

    def _store(self, k_new, v_new, num_B, scores, counts) -> MixedPrecisionKVCache:
        """Store the new tokens (every token leaving the window to low precision), accumulate
        ``scores`` and ``counts`` (window, table, new) and re-select the table (H2O's greedy
        step)."""
        sw_BR, shi_BS, snew_BT = scores
        b, t = k_new.shape[:2]
        n_B = self.lengths_B
        r, bi = self.k.residual, jnp.arange(b)[:, None]
        # accumulate: the window's slots hold the R consecutive positions from Q(n)
        wpos_BR = self.k.quantized_count(n_B)[:, None] + jnp.arange(r, dtype=jnp.int32)[None]
        win_score = self.win_score_BR.at[bi, wpos_BR % r].add(sw_BR)
        hi_score = self.hi_score_BS + shi_BS
        # the tokens leaving the window: positions Q(n) .. Q(n + num) - 1, from the window or new
        q_old, q_new = self.k.quantized_count(n_B), self.k.quantized_count(n_B + num_B)
        pos_BP = q_old[:, None] + jnp.arange(r + t, dtype=jnp.int32)[None, :]
        old_BP = pos_BP < n_B[:, None]
        from_new = jnp.clip(pos_BP - n_B[:, None], 0, t - 1)

        def pending(window_rows, new_rows):
            sel = old_BP.reshape(*old_BP.shape, *([1] * (new_rows.ndim - 2)))
            return jnp.where(sel, window_rows, new_rows.astype(window_rows.dtype)[bi, from_new])

        cand_k = pending(self.k.window_at(pos_BP), k_new)
        cand_v = pending(self.v.window_at(pos_BP), v_new)
        cand_score = pending(win_score[bi, pos_BP % r], snew_BT)
        hi_metric, cand_metric = hi_score, cand_score
        stats = {}
        if self.normalized:  # ZipCache: scores over the number of queries that saw the token
            cw_BR, chi_BS, cnew_BT = counts
            win_count = self.win_count_BR.at[bi, wpos_BR % r].add(cw_BR)
            hi_count = self.hi_count_BS + chi_BS
            cand_count = pending(win_count[bi, pos_BP % r], cnew_BT)
            hi_metric = hi_score / jnp.maximum(hi_count, 1.0)
            cand_metric = cand_score / jnp.maximum(cand_count, 1.0)
            stats["win_count_BR"] = write_rows(win_count, cnew_BT, n_B, num_B, window=r)
        s = self.important
        if s:  # the S most salient among the table and the leaving tokens stay
            metric_all = jnp.concatenate(
                [jnp.where(self.hi_pos_BS >= 0, hi_metric, -jnp.inf),
                 jnp.where(pos_BP < q_new[:, None], cand_metric, -jnp.inf)], axis=1,
            )  # fmt: skip
            top, idx_BS = jax.lax.top_k(metric_all, s)

            def pick(hi, cand):
                return jnp.concatenate([hi, cand.astype(hi.dtype)], axis=1)[bi, idx_BS]

            hi_pos = jnp.where(jnp.isfinite(top), pick(self.hi_pos_BS, pos_BP), -1)
            keep = hi_pos >= 0
            stats.update(
                hi_k_BSKH=pick(self.hi_k_BSKH, cand_k),
                hi_v_BSKV=pick(self.hi_v_BSKV, cand_v),
                hi_pos_BS=hi_pos,
                hi_score_BS=jnp.where(keep, pick(hi_score, cand_score), 0.0),
            )
            if self.normalized:
                stats["hi_count_BS"] = jnp.where(keep, pick(hi_count, cand_count), 0.0)
        return self.replace(
            k=self.k.store(n_B, k_new, num_B),
            v=self.v.store(n_B, v_new, num_B),
            win_score_BR=write_rows(win_score, snew_BT, n_B, num_B, window=r),
            **stats,
        )

    def write(self, k_BTKH, v_BTKV, num_new_B=None) -> MixedPrecisionKVCache:
        """Store T new keys/values after ``lengths_B`` with no attention (so no score is
        accumulated: the table keeps its entries, then the oldest leaving tokens); lengths
        unchanged (``advance`` counts them)."""
        self._check_new(k_BTKH, v_BTKV)
        b, t = k_BTKH.shape[:2]
        zeros = (
            jnp.zeros((b, self.k.residual)),
            jnp.zeros((b, self.important)),
            jnp.zeros((b, t)),
        )
        return self._store(k_BTKH, v_BTKV, _num_new(num_new_B, t, b), zeros, zeros)

    def update_and_attend(
        self, q_BTNH, k_BTKH, v_BTKV, *, num_new_B=None, mask=None, **op_kwargs
    ) -> tuple[jax.Array, MixedPrecisionKVCache]:
        """As ``KVCache.update_and_attend``: one softmax over the low-precision slots, the
        full-precision table, the window and the new tokens (see the module); the scores of
        the full-precision keys accumulate and the table is re-selected."""
        self._check_new(k_BTKH, v_BTKV)
        b, t = q_BTNH.shape[:2]
        num_B = _num_new(num_new_B, t, b)
        extra = [(self.hi_pos_BS, self.hi_k_BSKH, self.hi_v_BSKV)] if self.important else []
        o, _, lse_BNT = self._attend_and_store(
            q_BTNH, (k_BTKH, v_BTKV), num_new_B, mask=mask, hide_BC=self._hide_BC(),
            extra_tail=extra, return_lse=True, **op_kwargs,
        )  # fmt: skip
        scores, counts = self._scores(
            q_BTNH, k_BTKH, num_B, lse_BNT, mask=mask, scale=op_kwargs.get("scale"),
            logits_soft_cap=op_kwargs.get("logits_soft_cap"),
        )  # fmt: skip
        cache = self._store(k_BTKH, v_BTKV, num_B, scores, counts)
        return o, cache.advance(num_B)
