"""Multi-head attention with MHA / GQA / MQA / SQA head layouts: the ``"mha"`` attention kind.

N query heads share K key/value heads in groups of G = N / K (query head n reads kv head
n // G): K = N is MHA, 1 < K < N is GQA, K = 1 is MQA. SQA (Sparse Query Attention) keeps the
nominal ``num_heads`` for sizing but projects to fewer query heads ``num_query_heads`` (score
FLOPs scale with num_query_heads / num_heads); it combines with any K dividing it. Values may
have their own head count K_v (``num_v_heads``, dividing the query heads). Optional:
RoPE, per-head RMS qk-norm, q/k/v and o biases, logit soft-capping, a sliding window and
attention dropout. The attention itself is ``jaxattn.dot_product_attention``; decoding hands
queries and new keys/values to a ``KVCache`` (format "dense", policy "full" or "sink_window",
per ``cache``), which attends over itself. Stages (see ``jaxattn.layers.AttentionLayer``):
project (q, k, v Linears), qk_transform (qk-norm, RoPE), the op, head_gate (identity), out
(o Linear).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.cache import CacheConfig, KVCache, dense_cache
from jaxattn.cache._config import LAYOUT_FORMATS
from jaxattn.layers import _validate as v
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import AttentionLayer, dropout_args, register_kind
from jaxattn.layers._linear import Linear
from jaxattn.layers._norm import RMSNorm
from jaxattn.masks import Causal, SlidingWindow
from jaxattn.ops.rope import RopeConfig, apply_rope

__all__ = ["AttentionConfig", "Attention"]

_DROPOUT_TAG = 1  # ctx.key site of the attention-probability dropout


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Hyper-parameters of :class:`Attention` (the ``"mha"`` kind).

    Attributes:
      d_model: model width D.
      num_heads: nominal query heads (sets the default head_dim).
      num_kv_heads: K, key/value heads (default num_heads); must divide the query heads.
      num_v_heads: K_v, value heads (default K); must divide the query heads.
      head_dim: H, per-head q/k width (default d_model // num_heads).
      v_head_dim: V, per-head value width (default H).
      num_query_heads: SQA: the query heads actually used (default num_heads), <= num_heads.
      rope: RoPE applied to q and k (None: no positional rotation).
      qk_norm: RMS-normalise each q and k head (over H) before RoPE.
      qkv_bias: biases on the q, k and v projections (Qwen2).
      o_bias: bias on the output projection.
      logits_soft_cap: cap · tanh(logits / cap) when set (> 0).
      sliding_window: W keys visible to each query (itself and W - 1 before), None = all.
      softmax_scale: logit scale (default 1/sqrt(H)).
      norm_eps: epsilon of the qk-norm (> 0).
      dropout: attention-probability dropout rate in [0, 1) (training only: needs ctx.rng).
      implementation: ``dot_product_attention`` implementation name.
      cache: the decoding cache (``jaxattn.cache.CacheConfig``: format "dense" or a quantized
        one such as "kivi", policy "full" or "sink_window"; None: full). "sink_window"
        needs ``sliding_window`` unset.
      dtype: compute dtype (None: the input's dtype); param_dtype: parameter dtype.
    """

    kind: ClassVar[str] = "mha"

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    num_v_heads: int | None = None
    head_dim: int | None = None
    v_head_dim: int | None = None
    num_query_heads: int | None = None
    rope: RopeConfig | None = None
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    logits_soft_cap: float | None = None
    sliding_window: int | None = None
    softmax_scale: float | None = None
    norm_eps: float = 1e-6
    dropout: float = 0.0
    implementation: str = "auto"
    cache: CacheConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        v.check_int(o, "d_model", self.d_model)
        v.check_int(o, "num_heads", self.num_heads)
        for name in (
            "num_kv_heads",
            "num_v_heads",
            "head_dim",
            "v_head_dim",
            "num_query_heads",
            "sliding_window",
        ):
            v.check_optional_int(o, name, getattr(self, name))
        v.check_float(o, "logits_soft_cap", self.logits_soft_cap, optional=True)
        v.check_float(o, "softmax_scale", self.softmax_scale, optional=True)
        v.check_float(o, "norm_eps", self.norm_eps)
        v.check_rate(o, "dropout", self.dropout)
        v.check_implementation(o, "implementation", self.implementation)
        v.check_dtype(o, "dtype", self.dtype, optional=True)
        v.check_dtype(o, "param_dtype", self.param_dtype)
        v.check_head_split(o, self.num_heads, self.d_model, self.head_dim)
        nq, k = self.n_q, self.n_kv
        if not 0 < nq <= self.num_heads:
            raise ValueError(f"num_query_heads={nq} must be in [1, num_heads={self.num_heads}]")
        if nq % k:
            raise ValueError(f"num_kv_heads={k} must divide the query heads ({nq})")
        if nq % self.n_v:
            raise ValueError(f"num_v_heads={self.n_v} must divide the query heads ({nq})")
        v.check_cache(o, self.cache, formats=LAYOUT_FORMATS["dense"])
        if self.cache is not None and self.cache.policy != "full" and self.sliding_window:
            raise ValueError(
                f"{o}: cache.policy={self.cache.policy!r} with sliding_window="
                f"{self.sliding_window}: a ring cache serves causal layers only (a window W "
                "is CacheConfig(policy='sink_window', sink=0, window=W) on a causal layer)"
            )
        if self.rope is not None and not isinstance(self.rope, RopeConfig):
            raise ValueError(f"rope must be a RopeConfig or None, got {type(self.rope).__name__}")
        if self.rope is not None and (self.rope.rotary_dim or 0) > self.h:
            raise ValueError(f"rope.rotary_dim={self.rope.rotary_dim} > head_dim={self.h}")

    @classmethod
    def from_model(cls, m, layer: int) -> AttentionConfig:
        """Layer ``layer``'s config from a ``models.ModelConfig``'s fields."""
        window = m.sliding_window
        if window is not None and m.sliding_window_layers is not None:
            window = window if layer in m.sliding_window_layers else None
        return cls(
            d_model=m.d_model,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            num_query_heads=m.num_query_heads,
            rope=m.rope,
            qk_norm=m.qk_norm,
            qkv_bias=m.qkv_bias,
            o_bias=m.o_bias,
            logits_soft_cap=m.logits_soft_cap,
            sliding_window=window,
            norm_eps=m.norm_eps,
            dropout=m.attention_dropout,
            implementation=m.implementation,
            cache=m.cache,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
        )

    def build(self, *, rngs: nnx.Rngs) -> Attention:
        """The :class:`Attention` module of this config."""
        return Attention(self, rngs=rngs)

    def _refuse_own_mask_options(self, method: str) -> None:
        """For kinds whose op builds its own mask (LM-Infinite, Landmark): a sliding window,
        soft cap, dropout or separate value heads raise ValueError naming them, and a cache
        must keep every token (policy "full")."""
        o = type(self).__name__
        bad = dict(
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
            dropout=self.dropout or None,
            num_v_heads=None if self.n_v == self.n_kv else self.num_v_heads,
        )
        bad = {k: x for k, x in bad.items() if x is not None}
        if bad:
            raise ValueError(f"{o}: {bad} are not {method} options")
        if self.cache is not None and self.cache.policy != "full":
            raise ValueError(f"{o}: cache.policy={self.cache.policy!r}: {method} needs 'full'")

    @property
    def n_q(self) -> int:
        """Query heads used (N)."""
        return self.num_heads if self.num_query_heads is None else self.num_query_heads

    @property
    def n_kv(self) -> int:
        """Key/value heads (K)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def n_v(self) -> int:
        """Value heads (K_v)."""
        return self.n_kv if self.num_v_heads is None else self.num_v_heads

    @property
    def h(self) -> int:
        """Query/key head dim (H)."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def v(self) -> int:
        """Value head dim (V)."""
        return self.h if self.v_head_dim is None else self.v_head_dim

    @property
    def mask(self):
        """The mask spec: causal, or a causal window of ``sliding_window`` keys."""
        if self.sliding_window is None:
            return Causal()
        return SlidingWindow(left=self.sliding_window - 1, right=0)


register_kind("mha", AttentionConfig)


class Attention(AttentionLayer):
    """Causal self-attention (MHA / GQA / MQA / SQA) with optional cache-based decoding.

    Projections (``Linear``; kernel logical axes): q [D, N, H] (embed, heads, head_dim),
    k [D, K, H] and v [D, K_v, V] (embed, kv_heads, head_dim), o [N, V, D] (heads, head_dim,
    embed); parameter paths ``q/kernel``, ``q/bias``, ..., ``q_norm/scale``.

    Args:
      config: an :class:`AttentionConfig`.
      rngs: parameter RNGs.
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, n, k, kv, h, vd = c.d_model, c.n_q, c.n_kv, c.n_v, c.h, c.v
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.q = Linear(
            (d,), (n, h), axes=("embed", "heads", "head_dim"), use_bias=c.qkv_bias, **common
        )
        self.k = Linear(
            (d,), (k, h), axes=("embed", "kv_heads", "head_dim"), use_bias=c.qkv_bias, **common
        )
        self.v = Linear(
            (d,), (kv, vd), axes=("embed", "kv_heads", "head_dim"), use_bias=c.qkv_bias, **common
        )
        self.o = Linear(
            (n, vd), (d,), axes=("heads", "head_dim", "embed"), use_bias=c.o_bias, **common
        )
        if c.qk_norm:
            norm = dict(eps=c.norm_eps, axis_name="head_dim", param_dtype=c.param_dtype, rngs=rngs)
            self.q_norm = RMSNorm(h, **norm)
            self.k_norm = RMSNorm(h, **norm)

    def project(self, x_BTD: jax.Array, ctx: Context):
        """q_BTNH and (k_BTKH, v_BTKV)."""
        return self.q(x_BTD, ctx), (self.k(x_BTD, ctx), self.v(x_BTD, ctx))

    def qk_transform(self, q_BTNH, kv, ctx: Context):
        """qk-norm, then RoPE at ``ctx.positions_BT`` (the keys stay unrotated when
        ``ctx.keys_pre_rope``: the cache rotates them, see ``attend_cache``)."""
        c = self.config
        k_BTKH, v_BTKV = kv
        if c.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if c.rope is not None:
            dt = q_BTNH.dtype
            q_BTNH = apply_rope(q_BTNH, ctx.positions_BT, c.rope).astype(dt)
            if not ctx.keys_pre_rope:
                k_BTKH = apply_rope(k_BTKH, ctx.positions_BT, c.rope).astype(dt)
        return q_BTNH, (k_BTKH, v_BTKV)

    def _op_args(self, ctx: Context) -> dict:
        c = self.config
        return dict(
            mask=c.mask,
            scale=c.softmax_scale,
            logits_soft_cap=c.logits_soft_cap,
            implementation=c.implementation,
            **dropout_args(c.dropout, ctx, _DROPOUT_TAG),
        )

    def attention_inputs(self, q_BTNH, kv, ctx: Context):
        """The op's operands: q_BTNH, k_BTKH, v_BTKV (kv heads not repeated)."""
        k_BTKH, v_BTKV = kv
        return q_BTNH, k_BTKH, v_BTKV

    def attention_args(self, ctx: Context) -> dict:
        """Causal (windowed) attention within ``ctx.segment_ids_BT``, soft cap, dropout."""
        return dict(self._op_args(ctx), segment_ids=ctx.segment_ids_BT)

    def attend_cache(self, q_BTNH, kv, cache: KVCache, ctx: Context, *, num_new_B=None):
        """The cache attends over itself and the new k/v, stores them -> (o_BTNV, cache).
        A cache of pre-RoPE keys (``ctx.keys_pre_rope``) gets the layer's ``rope`` too."""
        k_BTKH, v_BTKV = kv
        rope = dict(rope=self.config.rope) if ctx.keys_pre_rope else {}
        return cache.update_and_attend(
            q_BTNH, k_BTKH, v_BTKV, num_new_B=num_new_B, **rope, **self._op_args(ctx)
        )

    def out(self, o_BTNV: jax.Array, ctx: Context) -> jax.Array:
        """o projection [B, T, N, V] -> [B, T, D]."""
        return self.o(o_BTNV, ctx)

    def init_cache(self, batch: int, capacity: int, dtype=jnp.bfloat16, cache=None) -> KVCache:
        """An empty :class:`KVCache` [B, C, K, H] for this layer, of ``config.cache``'s format
        and policy (``cache``: fields set over it, see ``cache_config``); a "sink_window" ring
        has C = sink + window slots whatever ``capacity`` is; a quantized format gives a
        ``QuantizedKVCache``."""
        c = self.config
        config = self.cache_config(cache)
        cache = dense_cache(
            batch=batch,
            capacity=capacity,
            num_kv_heads=c.n_kv,
            head_dim=c.h,
            v_head_dim=c.v,
            num_v_heads=c.n_v,
            dtype=dtype,
            config=config,
        )
        if getattr(cache, "pre_rope", False) and (
            type(self).qk_transform is not Attention.qk_transform
            or type(self).attend_cache is not Attention.attend_cache
        ):  # the pre-RoPE seam is Attention's own qk_transform / attend_cache
            raise ValueError(
                f"cache.format={config.format!r} stores pre-RoPE keys, which "
                f"{type(self).__name__}'s own qk_transform / attend_cache do not provide"
            )
        return cache
