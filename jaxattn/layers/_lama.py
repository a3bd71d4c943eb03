"""Low-rank factorised compact multi-head attention (LAMA; Mehta et al. 2019, arXiv 1912.00835):
:func:`lama_pool` (the paper's form) and the ``"lowrank_mhsa"`` kind (its causal-LM adaptation).

The paper scores each token h_i against one global context vector c with a low-rank bilinear
form shared by the m heads (low-rank bilinear pooling):

    f_j(h_i, c) = Σ_r P[r, j] · (Uᵀ h_i)_r · (Vᵀ c)_r,     U, V [d, R],  P [R, m]
    a_j = softmax_i f_j(h_i, c)  (over the unmasked tokens),   M_j = Σ_i a_ij h_i

so head j's affinity is the bilinear h^T W_j c with W_j = U diag(P[:, j]) Vᵀ of rank <= R: the
heads cost 2·d·R + R·m parameters instead of m·d² (or MHSA's per-head projections), and one
global query makes it O(N) in the sequence length. Any m bilinear forms W_j are reached at
full rank R = m·d (U = [I … I], V = [W_1ᵀ … W_mᵀ], P the block indicator), the exact
reduction the tests check. c is the mean of the unmasked h_i (the paper's global context).

``"lowrank_mhsa"`` (a decoder layer): position t's global context is the causal mean of the
inputs so far, c_t = mean_{s<=t} x_s (within its packed sequence), its N head queries are
q_t,j = P[:, j] ∘ (Vᵀ c_t) in the R-dim space and the one shared key is k_s = Uᵀ x_s, so the
scores are exactly f_j(x_s, c_t); values are one shared head v_s = x_s W_v [V = d / N], and the
heads' outputs go through the output projection [N, V, D]. The cache holds R + V numbers per
token (one key and one value head) and, in its history row, the running sum of x for c_t.
In a causal LM every position has its own context vector, so the layer is O(T²) like any
attention (with the narrow, shared key); the O(N) form is :func:`lama_pool`.

Checked against the paper's abstract (low-rank factorised affinity, global context query,
attention over GRU states); the bilinear-pooling form above follows the paper's description,
its exact equation (e.g. a tanh on the projections, c = mean vs. a learned vector) was not
readable here. The adaptation to a causal decoder layer is ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.cache import CacheConfig, HistoryKVCache, KVCache
from jaxattn.layers import _validate as val
from jaxattn.layers._base import param
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import AttentionLayer, register_kind
from jaxattn.layers._linear import Linear
from jaxattn.masks import Causal

__all__ = ["LowRankMHSAConfig", "LowRankMHSA", "lama_pool"]


def lama_pool(h_BSD, u_DR, w_DR, p_RM, mask_BS=None):
    """LAMA's structured sentence representation (module docstring), O(S).

    Args:
      h_BSD: token states [B, S, d]; u_DR, w_DR: U and V [d, R]; p_RM: P [R, m].
      mask_BS: True on real tokens (None: all).

    Returns:
      (M_BMD [B, m, d], a_BMS [B, m, S]: each head's attention, rows summing to 1, 0 on padding).
    """
    h = h_BSD.astype(jnp.float32)
    mask_BS = jnp.ones(h.shape[:2], bool) if mask_BS is None else mask_BS
    count_B1 = jnp.maximum(mask_BS.sum(-1, keepdims=True), 1)
    c_BD = jnp.sum(jnp.where(mask_BS[..., None], h, 0), 1) / count_B1
    q_BMR = jnp.einsum("bd,dr,rm->bmr", c_BD, w_DR, p_RM)
    f_BMS = jnp.einsum("bmr,bsd,dr->bms", q_BMR, h, u_DR)
    f_BMS = jnp.where(mask_BS[:, None], f_BMS, -jnp.inf)
    a_BMS = jax.nn.softmax(f_BMS, axis=-1)
    a_BMS = jnp.where(mask_BS[:, None], a_BMS, 0)
    return jnp.einsum("bms,bsd->bmd", a_BMS, h), a_BMS


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankMHSAConfig:
    """Hyper-parameters of :class:`LowRankMHSA` (the ``"lowrank_mhsa"`` kind).

    Attributes:
      d_model: D; num_heads: N (the paper's m), dividing D.
      rank: R, the affinity's rank (default D / N); full rank for N bilinear forms is N·D.
      softmax_scale: logit scale (default 1 / sqrt(R)).
      implementation, cache ("dense", policy "full"), dtype, param_dtype: as "mha".
    """

    kind: ClassVar[str] = "lowrank_mhsa"

    d_model: int
    num_heads: int
    rank: int | None = None
    softmax_scale: float | None = None
    implementation: str = "auto"
    cache: CacheConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        val.check_int(o, "d_model", self.d_model)
        val.check_int(o, "num_heads", self.num_heads)
        val.check_optional_int(o, "rank", self.rank)
        val.check_float(o, "softmax_scale", self.softmax_scale, optional=True)
        val.check_implementation(o, "implementation", self.implementation)
        val.check_cache(o, self.cache, formats=("dense",), policies=("full",))
        val.check_dtype(o, "dtype", self.dtype, optional=True)
        val.check_dtype(o, "param_dtype", self.param_dtype)
        if self.d_model % self.num_heads:
            raise ValueError(f"{o}: num_heads={self.num_heads} must divide d_model={self.d_model}")

    @classmethod
    def from_model(cls, m, layer: int) -> LowRankMHSAConfig:
        """Layer ``layer``'s config from a ``models.ModelConfig``'s fields."""
        return cls(
            d_model=m.d_model, num_heads=m.num_heads, implementation=m.implementation,
            cache=m.cache, dtype=m.dtype, param_dtype=m.param_dtype,
        )  # fmt: skip

    @property
    def r(self) -> int:
        """The rank R."""
        return self.d_model // self.num_heads if self.rank is None else self.rank

    @property
    def v(self) -> int:
        """The shared value head's width V = D / N."""
        return self.d_model // self.num_heads

    @property
    def num_affinity_params(self) -> int:
        """U, V and P: 2·D·R + R·N (MHSA's q / k projections: 2·D·D)."""
        return 2 * self.d_model * self.r + self.r * self.num_heads

    def build(self, *, rngs: nnx.Rngs) -> LowRankMHSA:
        """The :class:`LowRankMHSA` module of this config."""
        return LowRankMHSA(self, rngs=rngs)


register_kind("lowrank_mhsa", LowRankMHSAConfig)


class LowRankMHSA(AttentionLayer):
    """LAMA as a causal decoder layer (module docstring). Parameters: ``key`` (U) [D, 1, R],
    ``context`` (V) [D, R], ``head_mix`` (P) [R, N], ``v`` [D, 1, V], ``o`` [N, V, D]."""

    def __init__(self, config: LowRankMHSAConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        d, n, r, vd = c.d_model, c.num_heads, c.r, c.v
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.key = Linear((d,), (1, r), axes=("embed", "kv_heads", "head_dim"), **common)
        self.context = Linear((d,), (r,), axes=("embed", "head_dim"), **common)
        init = jax.nn.initializers.normal(1.0)
        self.head_mix = param(rngs, (r, n), ("head_dim", "heads"), init=init, dtype=c.param_dtype)
        self.v = Linear((d,), (1, vd), axes=("embed", "kv_heads", "head_dim"), **common)
        self.o = Linear((n, vd), (d,), axes=("heads", "head_dim", "embed"), **common)

    def project(self, x_BTD: jax.Array, ctx: Context):
        """(x itself: the context vectors need the running sum), (k_BT1R, v_BT1V)."""
        return x_BTD, (self.key(x_BTD, ctx), self.v(x_BTD, ctx))

    def _queries(self, sum_BTD, positions_BT, ctx):
        """q_BTNR = P ∘ (Vᵀ c_t), c_t = sum / (t + 1)."""
        c_BTD = sum_BTD / (positions_BT[..., None] + 1).astype(sum_BTD.dtype)
        ctx_BTR = self.context(c_BTD, ctx)
        return ctx_BTR[:, :, None, :] * self.head_mix[...].T.astype(ctx_BTR.dtype)

    def attention_inputs(self, x_BTD, kv, ctx: Context):
        """(q_BTNR, k_BT1R, v_BT1V) over the sequence: c_t the running mean of x in its
        packed sequence (positions count from each sequence's start)."""
        sum_BTD = _segment_cumsum(x_BTD.astype(jnp.float32), ctx.segment_ids_BT)
        q = self._queries(sum_BTD, ctx.positions_BT, ctx).astype(kv[0].dtype)
        return q, *kv

    def _op_args(self, ctx: Context) -> dict:
        c = self.config
        return dict(mask=Causal(), scale=c.softmax_scale, implementation=c.implementation)

    def attention_args(self, ctx: Context) -> dict:
        """Causal, within ``ctx.segment_ids_BT``."""
        return dict(self._op_args(ctx), segment_ids=ctx.segment_ids_BT)

    def attend_cache(self, x_BTD, kv, cache: HistoryKVCache, ctx: Context, *, num_new_B=None):
        """Running sums from the cache's history row; the cache attends -> (o, cache)."""
        prev_B1D = cache.history_BRC
        sums_BTD = prev_B1D + jnp.cumsum(x_BTD.astype(jnp.float32), axis=1)
        q = self._queries(sums_BTD, ctx.positions_BT, ctx).astype(kv[0].dtype)
        o, cache = cache.update_and_attend(q, *kv, num_new_B=num_new_B, **self._op_args(ctx))
        # the history row becomes the sum after each sequence's valid new tokens
        return o, cache.with_history(jnp.concatenate([prev_B1D, sums_BTD], 1), num_new_B)

    def out(self, o_BTNV: jax.Array, ctx: Context) -> jax.Array:
        """o projection [B, T, N, V] -> [B, T, D]."""
        return self.o(o_BTNV, ctx)

    def init_cache(
        self, batch: int, capacity: int, dtype=jnp.bfloat16, cache=None
    ) -> HistoryKVCache:
        """One key head of R and one value head of V per token, and the running sum of x."""
        c = self.config
        kv = KVCache.create(batch=batch, capacity=capacity, num_kv_heads=1, head_dim=c.r,
                            v_head_dim=c.v, dtype=dtype,
                            config=self.cache_config(cache))  # fmt: skip
        return HistoryKVCache.create(kv, history=1, channels=c.d_model, dtype=jnp.float32)


def _segment_cumsum(x_BTD, segment_ids_BT):
    """Cumulative sums over T that restart at every packed-sequence boundary."""
    cs = jnp.cumsum(x_BTD, axis=1)
    if segment_ids_BT is None:
        return cs
    b, t = segment_ids_BT.shape
    idx = jnp.arange(t)
    starts = jnp.where(
        jnp.concatenate(
            [jnp.ones((b, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], 1
        ),
        idx,
        0,
    )
    start_BT = jax.lax.cummax(starts, axis=1)
    before = jnp.take_along_axis(cs, jnp.maximum(start_BT - 1, 0)[..., None], axis=1)
    return cs - jnp.where((start_BT > 0)[..., None], before, 0)
