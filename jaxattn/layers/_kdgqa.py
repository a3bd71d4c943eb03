"""Key-driven grouped-query attention (Khan et al. 2024, arXiv 2408.08454): ``"kdgqa"``, ``"dgqa"``.

GQA with N query heads and K kv heads, but the N query heads are split among the kv heads in
proportion to a positive score per kv head instead of in uniform groups of N / K:

    a_k   = round(N · s_k / Σ_j s_j)           (then fixed up so that Σ a_k = N: while the sum
                                                is above N the largest a_k loses one, while
                                                below the smallest gains one; first index on ties)
    group = query heads [Σ_{j<k} a_j, Σ_{j<=k} a_j) read kv head k   (a_k may be 0)

* ``"kdgqa"`` (key-driven): s_k = ||k_k|| of the token's own keys, in every forward.
* ``"dgqa"`` (dynamic): s_k = m_k, an exponential moving average of the key-head norms kept in a
  non-parameter state (:class:`KeyNormStat`, ones at birth: uniform groups), updated
  m ← β·m + (1 - β)·mean_tokens ||k_k|| in training only (a forward with ``ctx.rng`` set and
  not a cache step); the allocation of a forward uses m from before its own update.

Equal scores give a_k = N / K exactly, i.e. uniform GQA (query head n reads kv head n // G).
Conversion from MHA (:func:`jaxattn.convert.mean_pool_kv_heads`) mean-pools each group's key and
value projections, as the paper initialises its up-trained ViTs.

Checked against the authors' code (github.com/zohaib-khan5040/key-driven-gqa, ``KDGQA`` and
``DGQA``, read only): the allocation by rounding with the argmax / argmin fix-up (KDGQA's; DGQA's
fixes up at random indices, made deterministic here), DGQA's "ema" statistic with β = 0.9, the
mean-pooling conversion. Adapted, not as there: (1) the reference takes KDGQA's norms over the
whole batch and sequence and min-max normalises them (equal norms then divide 0 by 0); a causal
LM cannot let a query's grouping depend on later keys, and decode must equal the forward, so
here the score is the token's own key norms, un-normalised; (2) the reference's default DGQA
statistic is "diff" (|m - norms|, the change), not implemented; (3) PGQA (noise subtracted from
the attention outputs, uniform groups) is its own kind, ``"pgqa"`` (``_pgqa.py``).

Cost: the grouping differs per token, so the op runs every query head against every kv head
(its queries repeated K times, a GQA call with K·N query heads over the K kv heads, kv never
repeated) and each head keeps the output of its own kv head: K times the score FLOPs of GQA.
The cache is GQA's (K·H + K·V per token) and caches attend the same way. Stages:
``attention_inputs`` repeats the queries (hooks at q / scores / pattern see all K·N pairs),
``head_gate`` computes the groups from the tokens' keys and keeps each head's own pair.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.cache import KVCache
from jaxattn.layers import _validate as v
from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import register_kind

__all__ = [
    "KDGQAConfig",
    "DGQAConfig",
    "KeyDrivenAttention",
    "KeyNormStat",
    "allocate_query_heads",
    "query_head_groups",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class KDGQAConfig(AttentionConfig):
    """:class:`AttentionConfig` with key-norm driven query-head groups (the ``"kdgqa"`` kind)."""

    kind: ClassVar[str] = "kdgqa"

    def __post_init__(self):
        super().__post_init__()
        if self.n_v != self.n_kv:
            raise ValueError(
                f"{type(self).__name__}: num_v_heads={self.n_v} must equal num_kv_heads="
                f"{self.n_kv} (a group reads one kv head's keys and values)"
            )
        if self.num_query_heads not in (None, self.num_heads):
            raise ValueError(f"{type(self).__name__}: num_query_heads (SQA) is not supported")

    def build(self, *, rngs: nnx.Rngs) -> KeyDrivenAttention:
        """The :class:`KeyDrivenAttention` module of this config."""
        return KeyDrivenAttention(self, rngs=rngs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DGQAConfig(KDGQAConfig):
    """``"kdgqa"`` with groups from a tracked key-norm EMA (the ``"dgqa"`` kind).

    Attributes:
      ema_decay: β of m ← β·m + (1 - β)·||k|| (training only), in (0, 1); the reference's 0.9.
    """

    kind: ClassVar[str] = "dgqa"

    ema_decay: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        v.check_float(type(self).__name__, "ema_decay", self.ema_decay)
        if not self.ema_decay < 1:
            raise ValueError(f"{type(self).__name__}.ema_decay={self.ema_decay} must be in (0, 1)")


register_kind("kdgqa", KDGQAConfig)
register_kind("dgqa", DGQAConfig)


class KeyNormStat(nnx.BatchStat):
    """DGQA's tracked key-norm statistic m [K] (not a parameter: no gradient, no optimizer).

    An ``nnx.BatchStat``: ``train.step`` carries these in its state (``state["stats"]``), so the
    EMA persists across train steps and through checkpoints."""


def allocate_query_heads(score_K: jax.Array, num_query_heads: int) -> jax.Array:
    """Query heads per kv head, a_k (module docstring), over the last axis of ``score_K``.

    Args:
      score_K: positive scores [..., K] (fp32 is used).
      num_query_heads: N.

    Returns:
      int32 [..., K], each row summing to N.
    """
    n, k = num_query_heads, score_K.shape[-1]
    s = score_K.astype(jnp.float32)
    a = jnp.round(s / jnp.sum(s, -1, keepdims=True) * n).astype(jnp.int32)

    def fix(_, a):  # |Σ round(x) - N| <= K / 2 when Σ x = N: K passes always suffice
        total = jnp.sum(a, -1, keepdims=True)
        over = jax.nn.one_hot(jnp.argmax(a, -1), k, dtype=jnp.int32)
        under = jax.nn.one_hot(jnp.argmin(a, -1), k, dtype=jnp.int32)
        return a - over * (total > n) + under * (total < n)

    return jax.lax.fori_loop(0, k, fix, a)


def query_head_groups(counts_K: jax.Array, num_query_heads: int) -> jax.Array:
    """The kv head each query head reads: idx[..., n] = #{k : Σ_{j<=k} a_j <= n} -> [..., N]."""
    ends_K = jnp.cumsum(counts_K, -1)
    n_N = jnp.arange(num_query_heads, dtype=ends_K.dtype)
    return jnp.sum(ends_K[..., None, :] <= n_N[:, None], -1).astype(jnp.int32)


class KeyDrivenAttention(Attention):
    """GQA whose query-head groups follow key norms (``"kdgqa"`` / ``"dgqa"``; module docstring).

    Parameters: those of :class:`Attention`; ``"dgqa"`` adds ``key_norm_ema`` [K], a
    :class:`KeyNormStat` (ones at birth).
    """

    def __init__(self, config: KDGQAConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        if isinstance(config, DGQAConfig):
            self.key_norm_ema = KeyNormStat(jnp.ones((config.n_kv,), jnp.float32))

    def groups(self, x_BTD: jax.Array, ctx: Context) -> jax.Array:
        """idx_BTN: the kv head of every query head at every token, from the tokens' key norms
        (the k projection and qk-norm again; RoPE is a rotation and keeps them). DGQA: from m,
        then m updated in training."""
        c = self.config
        k_BTKH = self.k(x_BTD, ctx)
        if c.qk_norm:
            k_BTKH = self.k_norm(k_BTKH)
        norms_BTK = jax.lax.stop_gradient(jnp.linalg.norm(k_BTKH.astype(jnp.float32), axis=-1))
        b, t, k = norms_BTK.shape
        if isinstance(c, DGQAConfig):
            m_K = self.key_norm_ema[...]
            if ctx.rng is not None and not ctx.decoding:  # training: the step passes a key
                mean_K = norms_BTK.reshape(-1, k).mean(0)
                self.key_norm_ema[...] = c.ema_decay * m_K + (1 - c.ema_decay) * mean_K
            norms_BTK = jnp.broadcast_to(m_K, (b, t, k))
        return query_head_groups(allocate_query_heads(norms_BTK, c.n_q), c.n_q)

    def attention_inputs(self, q_BTNH, kv, ctx: Context):
        """Every query head against every kv head: (q_BTMH, k_BTKH, v_BTKV), q repeated K times
        (M = K·N; row m = k·N + n is query head n for kv head k = m // N: GQA with groups of N)."""
        k_BTKH, v_BTKV = kv
        b, t, n, h = q_BTNH.shape
        k = k_BTKH.shape[2]
        q_BTMH = jnp.broadcast_to(q_BTNH[:, :, None], (b, t, k, n, h)).reshape(b, t, k * n, h)
        return q_BTMH, k_BTKH, v_BTKV

    def attend_cache(self, q_BTNH, kv, cache: KVCache, ctx: Context, *, num_new_B=None):
        """The cache attends every (kv head, query head) pair -> (o [B, T, K·N, V], cache)."""
        q_BTMH, k_BTKH, v_BTKV = self.attention_inputs(q_BTNH, kv, ctx)
        return cache.update_and_attend(
            q_BTMH, k_BTKH, v_BTKV, num_new_B=num_new_B, **self._op_args(ctx)
        )

    def head_gate(self, o_BTMV: jax.Array, ctx: Context, x_BTD: jax.Array | None = None):
        """Each query head keeps the output of its group's kv head: [B, T, K·N, V] -> o_BTNV."""
        idx_BTN = self.groups(x_BTD, ctx)
        b, t, _, vd = o_BTMV.shape
        o_BTKNV = o_BTMV.reshape(b, t, -1, idx_BTN.shape[-1], vd)
        return jnp.take_along_axis(o_BTKNV, idx_BTN[:, :, None, :, None], axis=2)[:, :, 0]
