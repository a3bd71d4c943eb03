"""Multi-head Latent Attention (DeepSeek-V2/V3), the ``"mla"`` kind, with absorbed decoding.

Per token, a down-projection gives the KV latent ``c`` (L = kv_lora_rank numbers, RMS-normed)
and one decoupled RoPE key ``k_pe`` (P = qk_rope_head_dim numbers) shared by every head.
Head n's key is ``[c · Wk_n | k_pe]`` and its value ``c · Wv_n``; queries are ``[q_nope | q_pe]``
(optionally through a rank-``q_lora_rank`` bottleneck). Training and cache-free prefill
up-project K/V per head and call the attention op with H = nope + P, V = v_head_dim.

Decoding caches only ``[c | k_pe]`` (L + P numbers per token; suffix ``X`` below stands for
that packed L + P axis) and absorbs the up-projections:
    q_nope · (c Wk_n)ᵀ = (q_nope Wk_nᵀ) · cᵀ      (key up-projection into the query)
    Σ_s p_s (c_s Wv_n) = (Σ_s p_s c_s) Wv_n      (value up-projection into the output)
so attention runs as MQA with one key ``[c | k_pe]`` of width L + P and one value ``c`` of
width L; no per-head K/V is ever materialised. The absorbed weights are the projections'
``effective_kernel()``, so an adapter on k_b / v_b is honoured by decoding too.

Fields for converted models (``jaxattn.convert.transmla``; HF DeepSeek holds none of them):
``kv_norm=False`` caches the latent as projected (no RMSNorm); ``rope_block_dim`` rotates the rope
key in blocks of that width, each like one head of that width (the K keys of a GQA layer side by
side, so GQA is exactly an MLA with P = K·H); ``qk_nope_head_dim=0`` has no latent key part (no
k_b); ``q_bias`` / ``kv_bias`` add biases to the query and kv down-projections (Qwen2's q/k/v
biases).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.cache import CacheConfig, LatentCache, latent_cache
from jaxattn.cache._config import LAYOUT_FORMATS
from jaxattn.layers import _validate as v
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import AttentionLayer, dropout_args, register_kind
from jaxattn.layers._linear import Linear
from jaxattn.layers._norm import RMSNorm
from jaxattn.masks import Causal
from jaxattn.ops.rope import RopeConfig, apply_rope, mla_softmax_scale_factor

__all__ = ["MLAConfig", "MultiHeadLatentAttention"]

_DROPOUT_TAG = 1

# model fields that only the "mha" kind reads: an MLA layer refuses them rather than ignore them
_MHA_ONLY = ("num_kv_heads", "num_query_heads", "sliding_window", "logits_soft_cap")
_MHA_ONLY_FLAGS = ("qkv_bias", "o_bias", "qk_norm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Hyper-parameters of :class:`MultiHeadLatentAttention` (the ``"mla"`` kind).

    Attributes:
      d_model: model width D.
      num_heads: N.
      q_lora_rank: query bottleneck rank (0: a full-rank query projection).
      kv_lora_rank: L, the cached latent width.
      qk_nope_head_dim: per-head key/query width without RoPE (0: no latent key part).
      qk_rope_head_dim: P, the decoupled RoPE width (one key shared by all heads).
      v_head_dim: V.
      rope: RoPE on the P dims (rotary_dim must equal P, or rope_block_dim when set).
      rope_block_dim: RoPE rotates q_pe and k_pe in consecutive blocks of this width, each
        block like one head of that width (None: one block of P). Divides P; even.
      kv_norm: RMS-normalise the kv latent (DeepSeek; False: cache the latent as projected).
      q_bias: a bias on the query projection (q, or q_b with a query bottleneck).
      kv_bias: a bias on the kv down-projection kv_a (latent and rope key).
      latent_norm_eps: epsilon of the q and kv latent RMSNorms (HF: 1e-6).
      softmax_scale: logit scale (default (nope + P)^-1/2 times the rope's YaRN mscale factor).
      dropout: attention-probability dropout rate in [0, 1) (training only: needs ctx.rng).
      implementation: ``dot_product_attention`` implementation name.
      cache: the decoding cache (``jaxattn.cache.CacheConfig``: format "latent" or a
        quantized one such as "kivi", policy "full" or "sink_window"; None: full).
      dtype: compute dtype (None: the input's); param_dtype: parameter dtype.
    """

    kind: ClassVar[str] = "mla"

    d_model: int
    num_heads: int
    q_lora_rank: int = 0
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig | None = None
    rope_block_dim: int | None = None
    kv_norm: bool = True
    q_bias: bool = False
    kv_bias: bool = False
    latent_norm_eps: float = 1e-6
    softmax_scale: float | None = None
    dropout: float = 0.0
    implementation: str = "auto"
    cache: CacheConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        v.check_cache(o, self.cache, formats=LAYOUT_FORMATS["latent"])
        for name in (
            "d_model",
            "num_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
        ):
            v.check_int(o, name, getattr(self, name))
        v.check_int(o, "q_lora_rank", self.q_lora_rank, minimum=0)
        v.check_int(o, "qk_nope_head_dim", self.qk_nope_head_dim, minimum=0)
        v.check_optional_int(o, "rope_block_dim", self.rope_block_dim)
        for name in ("kv_norm", "q_bias", "kv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{o}: {name} must be a bool, got {getattr(self, name)!r}")
        block = self.rope_width
        if block % 2 or self.qk_rope_head_dim % block:
            raise ValueError(
                f"{o}: rope_block_dim={self.rope_block_dim} must be even and divide "
                f"qk_rope_head_dim={self.qk_rope_head_dim}"
            )
        v.check_float(o, "latent_norm_eps", self.latent_norm_eps)
        v.check_float(o, "softmax_scale", self.softmax_scale, optional=True)
        v.check_rate(o, "dropout", self.dropout)
        v.check_implementation(o, "implementation", self.implementation)
        v.check_dtype(o, "dtype", self.dtype, optional=True)
        v.check_dtype(o, "param_dtype", self.param_dtype)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.rope is not None and not isinstance(self.rope, RopeConfig):
            raise ValueError(f"rope must be a RopeConfig or None, got {type(self.rope).__name__}")
        if self.rope is not None and self.rope.rotary_dim not in (None, block):
            what = "rope_block_dim" if self.rope_block_dim else "qk_rope_head_dim"
            raise ValueError(f"rope.rotary_dim={self.rope.rotary_dim} must equal {what}={block}")

    @classmethod
    def from_model(cls, m, layer: int) -> MLAConfig:
        """Layer ``layer``'s config from a ``models.ModelConfig``'s fields.

        Raises:
          ValueError: a model field only MHA layers read is set (set it per layer instead).
        """
        set_fields = [f for f in _MHA_ONLY if getattr(m, f) is not None]
        set_fields += [f for f in _MHA_ONLY_FLAGS if getattr(m, f)]
        if m.num_kv_heads == m.num_heads:  # MLA is MHA-shaped: K = N is the same model
            set_fields.remove("num_kv_heads")
        if set_fields:
            raise ValueError(
                f"layer {layer} is 'mla', which does not support the model fields "
                f"{set_fields} (set them for the 'mha' layers in layer_specs)"
            )
        if not 0 < m.kv_lora_rank <= m.d_model:
            raise ValueError(
                f"kv_lora_rank={m.kv_lora_rank} must be in [1, d_model={m.d_model}] "
                "(the latent compresses the model width)"
            )
        if not 0 <= m.q_lora_rank <= m.d_model:
            raise ValueError(
                f"q_lora_rank={m.q_lora_rank} must be in [0, d_model={m.d_model}] "
                "(0 = no query compression)"
            )
        return cls(
            d_model=m.d_model,
            num_heads=m.num_heads,
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_nope_head_dim,
            qk_rope_head_dim=m.qk_rope_head_dim,
            v_head_dim=m.v_head_dim,
            rope=m.rope,
            latent_norm_eps=m.latent_norm_eps,
            dropout=m.attention_dropout,
            implementation=m.implementation,
            cache=m.cache,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
        )

    def build(self, *, rngs: nnx.Rngs) -> MultiHeadLatentAttention:
        """The :class:`MultiHeadLatentAttention` module of this config."""
        return MultiHeadLatentAttention(self, rngs=rngs)

    @property
    def rope_width(self) -> int:
        """The width RoPE rotates at a time: rope_block_dim, or P."""
        return self.rope_block_dim or self.qk_rope_head_dim

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


register_kind("mla", MLAConfig)


class MultiHeadLatentAttention(AttentionLayer):
    """Causal MLA self-attention; ``__call__`` is the naive path, ``decode`` the absorbed one.

    Projections (``Linear``; kernel logical axes): q [D, N, nope+P] or q_a [D, Q] + q_b
    [Q, N, nope+P]; kv_a [D, L+P] (embed, kv_lora); k_b [L, N, nope] (absent when nope is 0)
    and v_b [L, N, V] (kv_lora, heads, head_dim); o [N, V, D]. Norms q_norm [Q] and kv_norm
    [L] (absent when ``kv_norm`` is False).

    Args:
      config: an :class:`MLAConfig`.
      rngs: parameter RNGs.
    """

    def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        pd = c.param_dtype
        d, n, q, l, p = c.d_model, c.num_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim
        common = dict(dtype=c.dtype, param_dtype=pd, rngs=rngs)
        heads = ("heads", "head_dim")
        if q:
            self.q_a = Linear((d,), (q,), axes=("embed", "q_lora"), **common)
            self.q_norm = RMSNorm(
                q, eps=c.latent_norm_eps, axis_name="q_lora", param_dtype=pd, rngs=rngs
            )
            self.q_b = Linear(
                (q,), (n, c.qk_head_dim), axes=("q_lora", *heads), use_bias=c.q_bias, **common
            )
        else:
            self.q = Linear(
                (d,), (n, c.qk_head_dim), axes=("embed", *heads), use_bias=c.q_bias, **common
            )
        self.kv_a = Linear((d,), (l + p,), axes=("embed", "kv_lora"), use_bias=c.kv_bias, **common)
        if c.kv_norm:
            self.kv_norm = RMSNorm(
                l, eps=c.latent_norm_eps, axis_name="kv_lora", param_dtype=pd, rngs=rngs
            )
        self.k_b = (
            Linear((l,), (n, c.qk_nope_head_dim), axes=("kv_lora", *heads), **common)
            if c.qk_nope_head_dim
            else None
        )
        self.v_b = Linear((l,), (n, c.v_head_dim), axes=("kv_lora", *heads), **common)
        self.o = Linear((n, c.v_head_dim), (d,), axes=(*heads, "embed"), **common)

    def project(self, x_BTD: jax.Array, ctx: Context):
        """(q_nope [B,T,N,nope], q_pe [B,T,N,P]) and (latent c [B,T,L], k_pe [B,T,1,P])."""
        c = self.config
        if c.q_lora_rank:
            q_BTNH = self.q_b(self.q_norm(self.q_a(x_BTD, ctx)), ctx)
        else:
            q_BTNH = self.q(x_BTD, ctx)
        q_nope_BTNH, q_pe_BTNP = jnp.split(q_BTNH, [c.qk_nope_head_dim], axis=-1)
        kv_BTX = self.kv_a(x_BTD, ctx)
        c_BTL = kv_BTX[..., : c.kv_lora_rank]
        if c.kv_norm:
            c_BTL = self.kv_norm(c_BTL)
        k_pe_BT1P = kv_BTX[:, :, None, c.kv_lora_rank :]
        return (q_nope_BTNH, q_pe_BTNP), (c_BTL, k_pe_BT1P)

    def qk_transform(self, q, kv, ctx: Context):
        """RoPE on the decoupled q_pe and k_pe at ``ctx.positions_BT`` (per rope block)."""
        c = self.config
        (q_nope_BTNH, q_pe_BTNP), (c_BTL, k_pe_BT1P) = q, kv
        if c.rope is not None:
            q_pe_BTNP = _blockwise_rope(q_pe_BTNP, ctx.positions_BT, c.rope, c.rope_width)
            k_pe_BT1P = _blockwise_rope(k_pe_BT1P, ctx.positions_BT, c.rope, c.rope_width)
        return (q_nope_BTNH, q_pe_BTNP), (c_BTL, k_pe_BT1P)

    def attention_inputs(self, q, kv, ctx: Context):
        """Naive MLA's per-head operands, up-projected from the latent: q_BTNH = [q_nope | q_pe],
        k_BTNH = [c·Wk_n | k_pe] (k_pe shared by every head), v_BTNV = c·Wv_n (H = nope + P)."""
        c = self.config
        (q_nope_BTNH, q_pe_BTNP), (c_BTL, k_pe_BT1P) = q, kv
        if self.k_b is None:  # no latent key part: the rope key is the whole key
            v_BTNV = self.v_b(c_BTL, ctx)
            k_nope_BTNH = jnp.zeros((*v_BTNV.shape[:3], 0), v_BTNV.dtype)
        else:  # k before v: the same program as before the k_b-free form existed
            k_nope_BTNH = self.k_b(c_BTL, ctx)
            v_BTNV = self.v_b(c_BTL, ctx)
        k_pe_BTNP = jnp.broadcast_to(k_pe_BT1P, (*k_nope_BTNH.shape[:3], c.qk_rope_head_dim))
        q_BTNH = jnp.concatenate([q_nope_BTNH, q_pe_BTNP], axis=-1)
        k_BTNH = jnp.concatenate([k_nope_BTNH, k_pe_BTNP], axis=-1)
        return q_BTNH, k_BTNH, v_BTNV

    def attention_args(self, ctx: Context) -> dict:
        """Causal attention within ``ctx.segment_ids_BT`` at the MLA scale, dropout."""
        c = self.config
        return dict(
            mask=Causal(),
            scale=c.scale,
            segment_ids=ctx.segment_ids_BT,
            implementation=c.implementation,
            **dropout_args(c.dropout, ctx, _DROPOUT_TAG),
        )

    def attend_cache(self, q, kv, cache: LatentCache, ctx: Context, *, num_new_B=None):
        """Absorbed MLA: the latent cache attends over itself and the new rows -> (o, cache)."""
        c = self.config
        (q_nope_BTNH, q_pe_BTNP), (c_BTL, k_pe_BT1P) = q, kv
        dt = q_nope_BTNH.dtype
        # Key up-projection absorbed into the query: q_lat = q_nope · Wk_nᵀ  [B, T, N, L].
        if self.k_b is None:  # no latent key part: the latent is only the value
            q_lat_BTNL = jnp.zeros((*q_nope_BTNH.shape[:3], c.kv_lora_rank), dt)
        else:
            k_b_LNH = self.k_b.effective_kernel(dt)
            q_lat_BTNL = jnp.einsum("btnh,lnh->btnl", q_nope_BTNH, k_b_LNH)
        q_BTNX = jnp.concatenate([q_lat_BTNL, q_pe_BTNP], axis=-1)
        # The output's last P columns (the rope part of each row used as the value) are dropped.
        o_row_BTNX, cache = cache.update_and_attend(
            q_BTNX,
            c_BTL,
            k_pe_BT1P[:, :, 0, :],
            num_new_B=num_new_B,
            mask=Causal(),
            scale=c.scale,
            implementation=c.implementation,
            **dropout_args(c.dropout, ctx, _DROPOUT_TAG),
        )
        o_lat_BTNL = o_row_BTNX[..., : c.kv_lora_rank]
        # Value up-projection absorbed into the output: o_n = (Σ p c) · Wv_n.
        o_BTNV = jnp.einsum("btnl,lnv->btnv", o_lat_BTNL, self.v_b.effective_kernel(dt))
        return o_BTNV, cache

    def out(self, o_BTNV: jax.Array, ctx: Context) -> jax.Array:
        """o projection [B, T, N, V] -> [B, T, D]."""
        return self.o(o_BTNV, ctx)

    def init_cache(self, batch: int, capacity: int, dtype=jnp.bfloat16, cache=None) -> LatentCache:
        """An empty :class:`LatentCache` [B, C, L + P] for this layer, of ``config.cache``'s
        format and policy (``cache``: fields set over it, see ``cache_config``); a "sink_window"
        ring has C = sink + window slots whatever ``capacity`` is; a quantized format gives a
        ``QuantizedLatentCache``."""
        c = self.config
        return latent_cache(
            batch=batch,
            capacity=capacity,
            kv_lora_rank=c.kv_lora_rank,
            rope_dim=c.qk_rope_head_dim,
            dtype=dtype,
            config=self.cache_config(cache),
        )


def _blockwise_rope(x_BTNP: jax.Array, positions_BT: jax.Array, rope: RopeConfig, width: int):
    """RoPE on each consecutive ``width``-dim block of x's last axis, as on heads of ``width``."""
    b, t, n, p = x_BTNP.shape
    x_BTMW = x_BTNP.reshape(b, t, n * (p // width), width)
    return apply_rope(x_BTMW, positions_BT, rope).astype(x_BTNP.dtype).reshape(b, t, n, p)
