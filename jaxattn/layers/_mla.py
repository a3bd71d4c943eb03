"""Multi-head Latent Attention (DeepSeek-V2/V3), with absorbed decoding over a latent cache.

Per token, a down-projection gives the KV latent ``c`` (L = kv_lora_rank numbers, RMS-normed)
and one decoupled RoPE key ``k_pe`` (P = qk_rope_head_dim numbers) shared by every head.
Head n's key is ``[c · Wk_n | k_pe]`` and its value ``c · Wv_n``; queries are ``[q_nope | q_pe]``
(optionally through a rank-``q_lora_rank`` bottleneck). Training and cache-free prefill
up-project K/V per head and call the attention op with H = nope + P, V = v_head_dim.

Decoding caches only ``[c | k_pe]`` (L + P numbers per token) and absorbs the up-projections:
    q_nope · (c Wk_n)ᵀ = (q_nope Wk_nᵀ) · cᵀ      (key up-projection into the query)
    Σ_s p_s (c_s Wv_n) = (Σ_s p_s c_s) Wv_n      (value up-projection into the output)
so attention runs as MQA with one key ``[c | k_pe]`` of width L + P and one value ``c`` of
width L; no per-head K/V is ever materialised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.cache import LatentCache
from jaxattn.layers._base import cast, dense, param
from jaxattn.layers._norm import RMSNorm
from jaxattn.masks import Causal
from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.rope import RopeConfig, apply_rope, mla_softmax_scale_factor

__all__ = ["MLAConfig", "MultiHeadLatentAttention"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Hyper-parameters of :class:`MultiHeadLatentAttention`.

    Attributes:
      d_model: model width D.
      num_heads: N.
      q_lora_rank: query bottleneck rank (0: a full-rank query projection).
      kv_lora_rank: L, the cached latent width.
      qk_nope_head_dim: per-head key/query width without RoPE.
      qk_rope_head_dim: P, the decoupled RoPE width (one key shared by all heads).
      v_head_dim: V.
      rope: RoPE on the P dims (rotary_dim must equal P).
      latent_norm_eps: epsilon of the q and kv latent RMSNorms (HF: 1e-6).
      softmax_scale: logit scale (default (nope + P)^-1/2 times the rope's YaRN mscale factor).
      implementation: ``dot_product_attention`` implementation name.
      dtype: compute dtype (None: the input's); param_dtype: parameter dtype.
    """

    d_model: int
    num_heads: int
    q_lora_rank: int = 0
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig | None = None
    latent_norm_eps: float = 1e-6
    softmax_scale: float | None = None
    implementation: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in (
            "d_model",
            "num_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.q_lora_rank < 0:
            raise ValueError(f"q_lora_rank={self.q_lora_rank} must be >= 0 (0: no compression)")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.rope is not None and self.rope.rotary_dim not in (None, self.qk_rope_head_dim):
            raise ValueError(
                f"rope.rotary_dim={self.rope.rotary_dim} must equal "
                f"qk_rope_head_dim={self.qk_rope_head_dim}"
            )

    @property
    def qk_head_dim(self) -> int:
        """nope + P, the per-head query/key width of the naive path."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        """The softmax logit scale."""
        if self.softmax_scale is not None:
            return self.softmax_scale
        factor = 1.0 if self.rope is None else mla_softmax_scale_factor(self.rope)
        return factor / math.sqrt(self.qk_head_dim)


class MultiHeadLatentAttention(nnx.Module):
    """Causal MLA self-attention; ``__call__`` is the naive path, ``decode`` the absorbed one.

    Parameters (logical axes): q [D, N, nope+P] or q_a [D, Q] + q_b [Q, N, nope+P];
    kv_a [D, L+P] (embed, kv_lora); k_b [L, N, nope], v_b [L, N, V] (kv_lora, heads,
    head_dim); o [N, V, D].

    Args:
      config: an :class:`MLAConfig`.
      rngs: parameter RNGs.
    """

    def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = c.param_dtype
        d, n, q, l, p = c.d_model, c.num_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim
        if q:
            self.q_a_DQ = param(rngs, (d, q), ("embed", "q_lora"), dtype=pd)
            self.q_norm = RMSNorm(
                q, eps=c.latent_norm_eps, axis_name="q_lora", param_dtype=pd, rngs=rngs
            )
            self.q_b_QNH = param(
                rngs, (q, n, c.qk_head_dim), ("q_lora", "heads", "head_dim"), dtype=pd
            )
        else:
            self.q_DNH = param(
                rngs, (d, n, c.qk_head_dim), ("embed", "heads", "head_dim"), dtype=pd
            )
        self.kv_a_DR = param(rngs, (d, l + p), ("embed", "kv_lora"), dtype=pd)
        self.kv_norm = RMSNorm(
            l, eps=c.latent_norm_eps, axis_name="kv_lora", param_dtype=pd, rngs=rngs
        )
        self.k_b_LNH = param(
            rngs, (l, n, c.qk_nope_head_dim), ("kv_lora", "heads", "head_dim"), dtype=pd
        )
        self.v_b_LNV = param(rngs, (l, n, c.v_head_dim), ("kv_lora", "heads", "head_dim"), dtype=pd)
        self.o_NVD = param(rngs, (n, c.v_head_dim, d), ("heads", "head_dim", "embed"), dtype=pd)

    def _project(self, x_BTD: jax.Array, positions_BT: jax.Array):
        """q_nope [B,T,N,nope], rotated q_pe [B,T,N,P], latent c [B,T,L], rotated k_pe [B,T,1,P]."""
        c = self.config
        dt = c.dtype or x_BTD.dtype
        x_BTD = x_BTD.astype(dt)
        if c.q_lora_rank:
            cq_BTQ = self.q_norm(dense(x_BTD, cast(self.q_a_DQ[...], dt)))
            q_BTNH = dense(cq_BTQ, cast(self.q_b_QNH[...], dt))
        else:
            q_BTNH = dense(x_BTD, cast(self.q_DNH[...], dt))
        q_nope_BTNH, q_pe_BTNP = jnp.split(q_BTNH, [c.qk_nope_head_dim], axis=-1)
        kv_BTR = dense(x_BTD, cast(self.kv_a_DR[...], dt))
        c_BTL = self.kv_norm(kv_BTR[..., : c.kv_lora_rank])
        k_pe_BT1P = kv_BTR[:, :, None, c.kv_lora_rank :]
        if c.rope is not None:
            q_pe_BTNP = apply_rope(q_pe_BTNP, positions_BT, c.rope).astype(dt)
            k_pe_BT1P = apply_rope(k_pe_BT1P, positions_BT, c.rope).astype(dt)
        return q_nope_BTNH, q_pe_BTNP, c_BTL, k_pe_BT1P

    def _out(self, o_BTNV: jax.Array) -> jax.Array:
        return dense(o_BTNV, cast(self.o_NVD[...], o_BTNV.dtype), n_in=2)

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
    ) -> jax.Array:
        """Naive MLA: per-head K/V up-projected from the latent, then causal attention.

        Args:
          x_BTD: input [B, T, D].
          positions_BT: int positions for RoPE (default 0..T-1).
          segment_ids_BT: int [B, T] packing segments.

        Returns:
          out_BTD [B, T, D].
        """
        c = self.config
        b, t, _ = x_BTD.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        q_nope_BTNH, q_pe_BTNP, c_BTL, k_pe_BT1P = self._project(x_BTD, positions_BT)
        dt = q_nope_BTNH.dtype
        k_nope_BTNH = dense(c_BTL, cast(self.k_b_LNH[...], dt))
        v_BTNV = dense(c_BTL, cast(self.v_b_LNV[...], dt))
        k_pe_BTNP = jnp.broadcast_to(k_pe_BT1P, (*k_nope_BTNH.shape[:3], c.qk_rope_head_dim))
        q_BTNH = jnp.concatenate([q_nope_BTNH, q_pe_BTNP], axis=-1)
        k_BTNH = jnp.concatenate([k_nope_BTNH, k_pe_BTNP], axis=-1)
        o_BTNV = dot_product_attention(
            q_BTNH,
            k_BTNH,
            v_BTNV,
            mask=Causal(),
            scale=c.scale,
            segment_ids=segment_ids_BT,
            implementation=c.implementation,
        )
        return self._out(o_BTNV)

    def init_cache(self, batch: int, capacity: int, dtype=jnp.bfloat16) -> LatentCache:
        """An empty :class:`LatentCache` [B, C, L + P] for this layer."""
        c = self.config
        return LatentCache.create(
            batch=batch,
            capacity=capacity,
            kv_lora_rank=c.kv_lora_rank,
            rope_dim=c.qk_rope_head_dim,
            dtype=dtype,
        )

    def decode(
        self, x_BTD: jax.Array, cache: LatentCache, *, num_new_B: jax.Array | None = None
    ) -> tuple[jax.Array, LatentCache]:
        """Absorbed MLA over the latent cache (prefill or decode step).

        Token t of sequence b sits at position ``cache.lengths_B[b] + t``.

        Args:
          x_BTD: new tokens' inputs [B, T, D].
          cache: this layer's LatentCache.
          num_new_B: valid new tokens per sequence (default T).

        Returns:
          (out_BTD, cache advanced by num_new_B).
        """
        c = self.config
        b, t, _ = x_BTD.shape
        start_B = cache.lengths_B
        positions_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        q_nope_BTNH, q_pe_BTNP, c_BTL, k_pe_BT1P = self._project(x_BTD, positions_BT)
        dt = q_nope_BTNH.dtype
        cache = cache.write(c_BTL, k_pe_BT1P[:, :, 0, :])
        # Key up-projection absorbed into the query: q_lat = q_nope · Wk_nᵀ  [B, T, N, L].
        q_lat_BTNL = jnp.einsum("btnh,lnh->btnl", q_nope_BTNH, cast(self.k_b_LNH[...], dt))
        q_BTNR = jnp.concatenate([q_lat_BTNL, q_pe_BTNP], axis=-1)
        row_BC1R = cache.latent_BCR[:, :, None, :].astype(dt)
        # The value is the whole row too (the very same array as the key), and the output's
        # last P columns (the rope part) are dropped: passing the latent slice row[..., :L]
        # instead would copy the whole cache every step.
        o_row_BTNR = dot_product_attention(
            q_BTNR,
            row_BC1R,
            row_BC1R,
            mask=Causal(),
            scale=c.scale,
            q_offset=start_B,
            kv_lengths=start_B + t,
            implementation=c.implementation,
        )
        o_lat_BTNL = o_row_BTNR[..., : c.kv_lora_rank]
        # Value up-projection absorbed into the output: o_n = (Σ p c) · Wv_n.
        o_BTNV = jnp.einsum("btnl,lnv->btnv", o_lat_BTNL, cast(self.v_b_LNV[...], dt))
        cache = cache.advance(t if num_new_B is None else num_new_B)
        return self._out(o_BTNV), cache
