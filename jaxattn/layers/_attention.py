"""Multi-head attention with MHA / GQA / MQA / SQA head layouts from one frozen config.

N query heads share K key/value heads in groups of G = N / K (query head n reads kv head
n // G): K = N is MHA, 1 < K < N is GQA, K = 1 is MQA. SQA (Sparse Query Attention) keeps the
nominal ``num_heads`` for sizing but projects to fewer query heads ``num_query_heads`` (score
FLOPs scale with num_query_heads / num_heads); it combines with any K dividing it. Optional:
RoPE, per-head RMS qk-norm, q/k/v and o biases, logit soft-capping and a sliding window.
The attention itself is ``jaxattn.dot_product_attention``; decoding reads a ``KVCache``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.cache import KVCache
from jaxattn.layers._base import cast, dense, param, zeros_init
from jaxattn.layers._norm import RMSNorm
from jaxattn.masks import Causal, SlidingWindow
from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.rope import RopeConfig, apply_rope

__all__ = ["AttentionConfig", "Attention"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Hyper-parameters of :class:`Attention`.

    Attributes:
      d_model: model width D.
      num_heads: nominal query heads (sets the default head_dim).
      num_kv_heads: K, key/value heads (default num_heads); must divide the query heads.
      head_dim: H, per-head q/k width (default d_model // num_heads).
      v_head_dim: V, per-head value width (default H).
      num_query_heads: SQA: the query heads actually used (default num_heads), <= num_heads.
      rope: RoPE applied to q and k (None: no positional rotation).
      qk_norm: RMS-normalise each q and k head (over H) before RoPE.
      qkv_bias: biases on the q, k and v projections (Qwen2).
      o_bias: bias on the output projection.
      logits_soft_cap: cap · tanh(logits / cap) when set.
      sliding_window: W keys visible to each query (itself and W - 1 before), None = all.
      softmax_scale: logit scale (default 1/sqrt(H)).
      norm_eps: epsilon of the qk-norm.
      implementation: ``dot_product_attention`` implementation name.
      dtype: compute dtype (None: the input's dtype); param_dtype: parameter dtype.
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
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
    implementation: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.d_model <= 0 or self.num_heads <= 0:
            raise ValueError(f"d_model={self.d_model} and num_heads={self.num_heads} must be > 0")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide d_model={self.d_model} "
                "when head_dim is not given"
            )
        nq, k = self.n_q, self.n_kv
        if not 0 < nq <= self.num_heads:
            raise ValueError(f"num_query_heads={nq} must be in [1, num_heads={self.num_heads}]")
        if k <= 0 or nq % k:
            raise ValueError(f"num_kv_heads={k} must divide the query heads ({nq})")
        if self.h <= 0 or self.v <= 0:
            raise ValueError(f"head_dim={self.h} and v_head_dim={self.v} must be > 0")
        if self.rope is not None and (self.rope.rotary_dim or 0) > self.h:
            raise ValueError(f"rope.rotary_dim={self.rope.rotary_dim} > head_dim={self.h}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")

    @property
    def n_q(self) -> int:
        """Query heads used (N)."""
        return self.num_heads if self.num_query_heads is None else self.num_query_heads

    @property
    def n_kv(self) -> int:
        """Key/value heads (K)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

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


class Attention(nnx.Module):
    """Causal self-attention (MHA / GQA / MQA / SQA) with optional cache-based decoding.

    Parameters (logical axes): q [D, N, H] (embed, heads, head_dim), k [D, K, H] and
    v [D, K, V] (embed, kv_heads, head_dim), o [N, V, D] (heads, head_dim, embed).

    Args:
      config: an :class:`AttentionConfig`.
      rngs: parameter RNGs.
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = c.param_dtype
        d, n, k, h, v = c.d_model, c.n_q, c.n_kv, c.h, c.v
        self.q_DNH = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype=pd)
        self.k_DKH = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype=pd)
        self.v_DKV = param(rngs, (d, k, v), ("embed", "kv_heads", "head_dim"), dtype=pd)
        self.o_NVD = param(rngs, (n, v, d), ("heads", "head_dim", "embed"), dtype=pd)
        if c.qkv_bias:
            self.q_bias_NH = param(rngs, (n, h), ("heads", "head_dim"), init=zeros_init, dtype=pd)
            self.k_bias_KH = param(
                rngs, (k, h), ("kv_heads", "head_dim"), init=zeros_init, dtype=pd
            )
            self.v_bias_KV = param(
                rngs, (k, v), ("kv_heads", "head_dim"), init=zeros_init, dtype=pd
            )
        if c.o_bias:
            self.o_bias_D = param(rngs, (d,), ("embed",), init=zeros_init, dtype=pd)
        if c.qk_norm:
            self.q_norm = RMSNorm(
                h, eps=c.norm_eps, axis_name="head_dim", param_dtype=pd, rngs=rngs
            )
            self.k_norm = RMSNorm(
                h, eps=c.norm_eps, axis_name="head_dim", param_dtype=pd, rngs=rngs
            )

    def _qkv(self, x_BTD: jax.Array, positions_BT: jax.Array):
        c = self.config
        dt = c.dtype or x_BTD.dtype
        x_BTD = x_BTD.astype(dt)
        q_BTNH = dense(x_BTD, cast(self.q_DNH[...], dt))
        k_BTKH = dense(x_BTD, cast(self.k_DKH[...], dt))
        v_BTKV = dense(x_BTD, cast(self.v_DKV[...], dt))
        if c.qkv_bias:
            q_BTNH = q_BTNH + cast(self.q_bias_NH[...], dt)
            k_BTKH = k_BTKH + cast(self.k_bias_KH[...], dt)
            v_BTKV = v_BTKV + cast(self.v_bias_KV[...], dt)
        if c.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if c.rope is not None:
            q_BTNH = apply_rope(q_BTNH, positions_BT, c.rope).astype(dt)
            k_BTKH = apply_rope(k_BTKH, positions_BT, c.rope).astype(dt)
        return q_BTNH, k_BTKH, v_BTKV

    def _out(self, o_BTNV: jax.Array) -> jax.Array:
        dt = o_BTNV.dtype
        out_BTD = dense(o_BTNV, cast(self.o_NVD[...], dt), n_in=2)
        if self.config.o_bias:
            out_BTD = out_BTD + cast(self.o_bias_D[...], dt)
        return out_BTD

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
    ) -> jax.Array:
        """Causal self-attention over the whole input (training / prefill without a cache).

        Args:
          x_BTD: input [B, T, D].
          positions_BT: int positions for RoPE (default 0..T-1 per row).
          segment_ids_BT: int [B, T]; tokens attend only within their segment (packing).

        Returns:
          out_BTD [B, T, D].
        """
        c = self.config
        b, t, _ = x_BTD.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        q_BTNH, k_BTKH, v_BTKV = self._qkv(x_BTD, positions_BT)
        o_BTNV = dot_product_attention(
            q_BTNH,
            k_BTKH,
            v_BTKV,
            mask=c.mask,
            scale=c.softmax_scale,
            logits_soft_cap=c.logits_soft_cap,
            segment_ids=segment_ids_BT,
            implementation=c.implementation,
        )
        return self._out(o_BTNV)

    def init_cache(self, batch: int, capacity: int, dtype=jnp.bfloat16) -> KVCache:
        """An empty :class:`KVCache` [B, C, K, H] for this layer."""
        c = self.config
        return KVCache.create(
            batch=batch,
            capacity=capacity,
            num_kv_heads=c.n_kv,
            head_dim=c.h,
            v_head_dim=c.v,
            dtype=dtype,
        )

    def decode(
        self, x_BTD: jax.Array, cache: KVCache, *, num_new_B: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Attend T new tokens to the cache and themselves (prefill or decode step).

        Token t of sequence b sits at position ``cache.lengths_B[b] + t``.

        Args:
          x_BTD: new tokens' inputs [B, T, D].
          cache: this layer's KVCache.
          num_new_B: valid new tokens per sequence (default T); trailing padding is written
            but not counted, so the next write overwrites it.

        Returns:
          (out_BTD, cache advanced by num_new_B).
        """
        c = self.config
        b, t, _ = x_BTD.shape
        start_B = cache.lengths_B
        positions_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        q_BTNH, k_BTKH, v_BTKV = self._qkv(x_BTD, positions_BT)
        cache = cache.write(k_BTKH, v_BTKV)
        dt = q_BTNH.dtype
        o_BTNV = dot_product_attention(
            q_BTNH,
            cache.k_BCKH.astype(dt),
            cache.v_BCKV.astype(dt),
            mask=c.mask,
            scale=c.softmax_scale,
            logits_soft_cap=c.logits_soft_cap,
            q_offset=start_B,
            kv_lengths=start_B + t,
            implementation=c.implementation,
        )
        cache = cache.advance(t if num_new_B is None else num_new_B)
        return self._out(o_BTNV), cache
