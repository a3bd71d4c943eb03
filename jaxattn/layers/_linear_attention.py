"""Linear-attention layers, the ``"linear"`` attention kind: a fixed-size state, no KV cache.

The op is ``jaxattn.ops.linear_attention`` (variants linear_attn, retention, simple_gla, gla,
delta_rule, gated_delta_rule); decoding keeps a ``jaxattn.cache.LinearStateCache`` per layer,
so a step costs the same at any context length. Stages (``jaxattn.layers.AttentionLayer``):

* project: q [D, N, H], k [D, K, H], v [D, K, H] Linears, plus the data-dependent gates as in
  flash-linear-attention's layers: a log gate log σ(x W_g + b_g) / ``gate_normalizer``
  ([D, K] for simple_gla / gated_delta_rule, [D, K, H] for gla) and β = σ(x W_β + b_β) [D, K]
  for the delta rules; retention's decays are RetNet's fixed γ_k = 1 - 2^(-5-k).
* qk_transform: the feature map φ on q and k, then (delta rules, ``qk_l2_norm``) unit-norm q
  and k, which keeps the delta rule's state update a contraction.
* the op (chunked form over the sequence, the state cache when decoding); out: o [N, H, D].

No rotary embedding: order enters through the causal state and its decays (the model config's
``rope`` is not used by these layers). Packed sequences (``segment_ids``) are refused: a state
would carry across segments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.cache import CacheConfig
from jaxattn.cache._state import LinearStateCache
from jaxattn.layers import _validate as v
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import AttentionLayer, register_kind
from jaxattn.layers._linear import Linear
from jaxattn.ops.linear_attention import (
    FEATURE_MAPS,
    LINEAR_IMPLEMENTATIONS,
    LINEAR_VARIANTS,
    feature_dim,
    linear_attention,
    resolve_feature_map,
)

__all__ = ["LinearAttentionConfig", "LinearAttention"]

_SCALAR_GATE = ("simple_gla", "gated_delta_rule")
_DELTA = ("delta_rule", "gated_delta_rule")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearAttentionConfig:
    """Hyper-parameters of :class:`LinearAttention` (the ``"linear"`` kind).

    Attributes:
      d_model: model width D.
      num_heads: N query heads; num_kv_heads: K (default N), dividing N; the state has K heads.
      head_dim: H of q, k and v (default d_model // num_heads).
      variant: one of ``jaxattn.ops.LINEAR_VARIANTS``.
      feature_map: φ on q and k: a name in ``jaxattn.ops.linear_attention.FEATURE_MAPS``;
        "nala" is NaLaFormer's norm-aware pair (``jaxattn.ops.nala``; the state's key dim
        becomes 2H; use it with ``normalize=True`` and ``qk_l2_norm=False``).
      normalize: divide by φ(q)·Σφ(k) (Katharopoulos et al.; not for the delta rules).
      qk_l2_norm: unit-norm q and k after φ (default: True for the delta rules).
      gate_normalizer: the log gate is log σ(·) / gate_normalizer (> 0; 16 as in GLA).
      chunk_size: steps per chunk of the chunked form (> 0).
      implementation: the op's implementation over the sequence ("chunked", "naive",
        "recurrent").
      cache: None, or a CacheConfig of format None and policy "full" (its dtype stores the
        state; default float32).
      dtype: compute dtype (None: the input's); param_dtype: parameter dtype.
    """

    kind: ClassVar[str] = "linear"

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    variant: str = "gated_delta_rule"
    feature_map: str = "identity"
    normalize: bool = False
    qk_l2_norm: bool | None = None
    gate_normalizer: float = 16.0
    chunk_size: int = 64
    implementation: str = "chunked"
    cache: CacheConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        v.check_int(o, "d_model", self.d_model)
        v.check_int(o, "num_heads", self.num_heads)
        v.check_optional_int(o, "num_kv_heads", self.num_kv_heads)
        v.check_optional_int(o, "head_dim", self.head_dim)
        v.check_int(o, "chunk_size", self.chunk_size)
        v.check_float(o, "gate_normalizer", self.gate_normalizer)
        v.check_dtype(o, "dtype", self.dtype, optional=True)
        v.check_dtype(o, "param_dtype", self.param_dtype)
        if self.variant not in LINEAR_VARIANTS:
            raise ValueError(f"{o}.variant={self.variant!r} must be one of {LINEAR_VARIANTS}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"{o}.feature_map={self.feature_map!r} must be one of {sorted(FEATURE_MAPS)}"
            )
        if self.variant == "gla" and feature_dim(self.feature_map, 2) != 2:
            raise ValueError(
                f"{o}.feature_map={self.feature_map!r} changes the key width, which "
                "variant='gla' (a decay per key dim) cannot take"
            )
        if self.implementation not in LINEAR_IMPLEMENTATIONS:
            raise ValueError(
                f"{o}.implementation={self.implementation!r} must be one of "
                f"{LINEAR_IMPLEMENTATIONS}"
            )
        if self.normalize and self.variant in _DELTA:
            raise ValueError(f"{o}.normalize=True is not defined for variant={self.variant!r}")
        v.check_head_split(o, self.num_heads, self.d_model, self.head_dim)
        if self.num_heads % self.n_kv:
            raise ValueError(f"{o}.num_kv_heads={self.n_kv} must divide num_heads={self.num_heads}")
        v.check_cache(o, self.cache, formats=(), policies=("full",))

    @classmethod
    def from_model(cls, m, layer: int) -> LinearAttentionConfig:
        """Layer ``layer``'s config from a ``models.ModelConfig``'s fields (heads, widths,
        dtypes, cache); the variant and its options come from the layer spec's overrides."""
        del layer
        return cls(
            d_model=m.d_model,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            cache=m.cache,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
        )

    def build(self, *, rngs: nnx.Rngs) -> LinearAttention:
        """The :class:`LinearAttention` module of this config."""
        return LinearAttention(self, rngs=rngs)

    @property
    def n_kv(self) -> int:
        """K, the kv (and state) heads."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def h(self) -> int:
        """H, the head dim of q, k and v."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def l2_norm(self) -> bool:
        """Whether q and k are unit-normed after the feature map."""
        return self.variant in _DELTA if self.qk_l2_norm is None else self.qk_l2_norm


register_kind("linear", LinearAttentionConfig)


class LinearAttention(AttentionLayer):
    """Causal linear attention with a recurrent-state cache (see the module docstring).

    Parameter paths: ``q/kernel``, ``k/kernel``, ``v/kernel``, ``o/kernel``, and per variant
    ``g/kernel`` + ``g/bias`` (log gate) and ``beta/kernel`` + ``beta/bias``.

    Args:
      config: a :class:`LinearAttentionConfig`.
      rngs: parameter RNGs.
    """

    def __init__(self, config: LinearAttentionConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, n, k, h = c.d_model, c.num_heads, c.n_kv, c.h
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.q = Linear((d,), (n, h), axes=("embed", "heads", "head_dim"), **common)
        self.k = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), **common)
        self.v = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), **common)
        self.o = Linear((n, h), (d,), axes=("heads", "head_dim", "embed"), **common)
        if c.variant in _SCALAR_GATE:
            self.g = Linear((d,), (k,), axes=("embed", "kv_heads"), use_bias=True, **common)
        elif c.variant == "gla":
            self.g = Linear(
                (d,), (k, h), axes=("embed", "kv_heads", "head_dim"), use_bias=True, **common
            )
        if c.variant in _DELTA:
            self.beta = Linear((d,), (k,), axes=("embed", "kv_heads"), use_bias=True, **common)

    def project(self, x_BTD: jax.Array, ctx: Context):
        """q_BTNH and (k_BTKH, v_BTKH, gates): gates = {"log_decay": ..., "beta": ...}."""
        c = self.config
        gates = {}
        if hasattr(self, "g"):  # log gate in fp32: it is summed over the sequence
            logit = self.g(x_BTD, ctx).astype(jnp.float32)
            gates["log_decay"] = jax.nn.log_sigmoid(logit) / c.gate_normalizer
        if hasattr(self, "beta"):
            gates["beta"] = jax.nn.sigmoid(self.beta(x_BTD, ctx).astype(jnp.float32))
        return self.q(x_BTD, ctx), (self.k(x_BTD, ctx), self.v(x_BTD, ctx), gates)

    def qk_transform(self, q_BTNH, kv, ctx: Context):
        """φ on q and k, then unit norms (``config.l2_norm``)."""
        c = self.config
        k_BTKH, v_BTKH, gates = kv
        phi_q, phi_k = resolve_feature_map(c.feature_map)
        q_BTNH, k_BTKH = phi_q(q_BTNH), phi_k(k_BTKH)
        if c.l2_norm:  # in fp32: the squared norm of bf16 entries loses precision
            unit = lambda x: (  # noqa: E731
                x.astype(jnp.float32)
                * jax.lax.rsqrt(
                    jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6
                )
            ).astype(x.dtype)
            q_BTNH, k_BTKH = unit(q_BTNH), unit(k_BTKH)
        return q_BTNH, (k_BTKH, v_BTKH, gates)

    def _op_args(self) -> dict:
        c = self.config
        return dict(variant=c.variant, normalize=c.normalize, chunk_size=c.chunk_size)

    def attend(self, q_BTNH, kv, ctx: Context) -> jax.Array:
        """The op over the sequence from a zero state -> o_BTNH."""
        if ctx.segment_ids_BT is not None:
            raise NotImplementedError(
                "LinearAttention cannot serve segment_ids (packed sequences): its state would "
                "carry across segments"
            )
        k_BTKH, v_BTKH, gates = kv
        return linear_attention(
            q_BTNH,
            k_BTKH,
            v_BTKH,
            implementation=self.config.implementation,
            **gates,
            **self._op_args(),
        )

    def attend_cache(self, q_BTNH, kv, cache: LinearStateCache, ctx: Context, *, num_new_B=None):
        """The state attends the new tokens and folds them in -> (o_BTNH, cache)."""
        k_BTKH, v_BTKH, gates = kv
        return cache.update_and_attend(
            q_BTNH, k_BTKH, v_BTKH, num_new_B=num_new_B, **gates, **self._op_args()
        )

    def out(self, o_BTNH: jax.Array, ctx: Context) -> jax.Array:
        """o projection [B, T, N, H] -> [B, T, D]."""
        return self.o(o_BTNH, ctx)

    def init_cache(
        self, batch: int, capacity: int, dtype=jnp.bfloat16, cache=None
    ) -> LinearStateCache:
        """A zero :class:`LinearStateCache` [B, K, F, H (+1)] (F: φ's width, 2H for "nala").
        ``capacity`` and ``dtype`` are not used: the state has a fixed size and is stored in
        float32 (a running sum) unless ``config.cache.dtype`` says otherwise."""
        del capacity, dtype
        c, cfg = self.config, self.cache_config(cache)
        store = None if cfg is None or cfg.dtype is None else jnp.dtype(cfg.dtype)
        return LinearStateCache.create(
            batch=batch,
            num_kv_heads=c.n_kv,
            head_dim=feature_dim(c.feature_map, c.h),
            state_dim=c.h + (1 if c.normalize else 0),
            dtype=store,
        )
