"""Compressed Convolutional Attention (Figliolia et al. 2025, arXiv 2510.04476): the ``"cca"`` kind.

CCA runs the whole attention in a latent space C (``compression``) times narrower than the
model: E = D / C latent channels split into N heads of h = E / N (CCGQA: K < N kv heads of the
same h, shared in groups of G = N / K). Per token x:

    q̃ = x W_q [N, h],   k̃ = x W_k [K, h],   ṽ = x W_v [K, h]          (down-projections)
    value shift: the second half of ṽ's K·h channels is the previous token's
    q = conv2(conv1(q̃)) + ½ k̃_g(n),   k_g = conv2(conv1(k̃))_g + ½ mean_{n ∈ g} q̃_n   (qk-mean)
    q ← q / ||q||,  k ← τ · k / ||k||  (L2 qk-norm, τ a learned scalar, √h at birth), then RoPE
    o = softmax(q kᵀ / √h) v  per head (the op, in the latent),    out = o W_o [E -> D]

conv1 is a causal depthwise convolution over the sequence (kernel k, per channel); conv2 a
causal convolution over the sequence that mixes the channels within each head ([k, heads, h,
h]); both start as the identity (our choice), so a fresh layer's convolutions pass q̃ and k̃
through. For K = N the qk-mean is q = conv(q̃) + ½(q̃ + k̃), k = conv(k̃) + ½(q̃ + k̃).

Costs: parameters D·E + 2·D·K·h + E·D (+ the small convolutions) against MHA's 4·D², score
FLOPs 2·N·T·S·h (1/C of MHA's at the same N), cache K·h keys + K·h values per token (1/C of
MHA's, 1/(C·G) with sharing). Decoding: the cache (:class:`jaxattn.cache.HistoryKVCache`) also
keeps the last 2(k - 1) tokens' q̃, k̃ and ṽ (a fixed few hundred numbers per sequence) for
the convolutions and the value shift.

With ``compression=1`` and ``convs``, ``qk_mean``, ``value_shift``, ``qk_l2_norm`` off it is the
"mha" kind with the same parameters, exactly.

Checked against the paper's abstract and a public third-party PyTorch CCGQA (read only): the
down-projections, attention in the latent, the two q / k convolutions (depthwise, then
channel-mixing), qk-mean, value shift (half the value channels from the previous token), L2
qk-norm with a learned key temperature, RoPE after the norm. Not checked against the paper's
equations (its text was not readable here): the exact grouping of conv2 (here: within each
head), the convolutions' initialisation (here: identity), and CCGQA's qk-mean (here per group;
the third-party code averages over all heads).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.cache import HistoryKVCache, KVCache
from jaxattn.layers import _validate as v
from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._base import param
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import register_kind
from jaxattn.ops.rope import apply_rope

__all__ = ["CCAConfig", "CompressedConvAttention", "causal_conv"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CCAConfig(AttentionConfig):
    """:class:`AttentionConfig` in a latent C times narrower (the ``"cca"`` kind; CCGQA with
    ``num_kv_heads`` < ``num_heads``). ``head_dim`` is derived (h = d_model / (C·N)).

    Attributes:
      compression: C >= 1, dividing d_model, with N dividing d_model / C.
      conv_kernel: k, the convolutions' width over the sequence (>= 1).
      convs: the two q / k convolutions; qk_mean: the qk-mean terms; value_shift: half the
        value channels from the previous token (needs K·h even); qk_l2_norm: L2-normalised
        q and k, times a learned temperature (else the op's 1/√h logit scale alone).
    """

    kind: ClassVar[str] = "cca"

    compression: int = 4
    conv_kernel: int = 3
    convs: bool = True
    qk_mean: bool = True
    value_shift: bool = True
    qk_l2_norm: bool = True

    def __post_init__(self):
        o = type(self).__name__
        v.check_int(o, "compression", self.compression)
        v.check_int(o, "conv_kernel", self.conv_kernel)
        v.check_int(o, "d_model", self.d_model)
        v.check_int(o, "num_heads", self.num_heads)
        latent = self.d_model // self.compression
        if self.d_model % self.compression or latent % self.num_heads:
            raise ValueError(
                f"{o}.compression={self.compression} must divide d_model={self.d_model}, and "
                f"num_heads={self.num_heads} the latent width d_model / compression"
            )
        if self.head_dim is not None and self.head_dim != latent // self.num_heads:
            raise ValueError(
                f"{o}: head_dim={self.head_dim} != d_model / (compression · num_heads) = "
                f"{latent // self.num_heads} (leave head_dim unset)"
            )
        for name in ("v_head_dim", "num_v_heads", "num_query_heads", "sliding_window"):
            if getattr(self, name) is not None:
                raise ValueError(f"{o}.{name}={getattr(self, name)!r}: not supported by CCA")
        if self.qk_norm:
            raise ValueError(f"{o}.qk_norm: CCA has its own L2 qk-norm (qk_l2_norm)")
        for name in ("convs", "qk_mean", "value_shift", "qk_l2_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{o}.{name}={getattr(self, name)!r} must be a bool")
        super().__post_init__()
        if self.value_shift and (self.n_kv * self.h) % 2:
            raise ValueError(
                f"{o}: value_shift needs an even K·h (num_kv_heads={self.n_kv}, h={self.h})"
            )

    @property
    def h(self) -> int:
        """The latent head dim h = d_model / (C · N)."""
        return self.d_model // self.compression // self.num_heads

    @property
    def history(self) -> int:
        """Tokens of q̃ / k̃ / ṽ the decode cache keeps: 2(k - 1) for the convs, >= 1."""
        return max(2 * (self.conv_kernel - 1) if self.convs else 0, 1)

    def build(self, *, rngs: nnx.Rngs) -> CompressedConvAttention:
        """The :class:`CompressedConvAttention` module of this config."""
        return CompressedConvAttention(self, rngs=rngs)


register_kind("cca", CCAConfig)


def causal_conv(x_BSC: jax.Array, w_J, *, heads: int | None = None, segments_BS=None):
    """y[t] = Σ_j x[t - j] · w[j] over the sequence axis, zeros before the start.

    Args:
      x_BSC: [B, S, C].
      w_J: depthwise [k, C], or (``heads`` set) within-head mixing [k, heads, h, h] (C = heads·h).
      segments_BS: packed-sequence ids: x[t - j] of another sequence than t counts as zero.

    Returns:
      [B, S, C] in x's dtype (fp32 accumulation).
    """
    b, s, c = x_BSC.shape
    y = jnp.zeros((b, s, c), jnp.float32)
    for j in range(w_J.shape[0]):
        xj = jnp.pad(x_BSC, ((0, 0), (j, 0), (0, 0)))[:, :s].astype(jnp.float32)
        if segments_BS is not None:
            sj = jnp.pad(segments_BS, ((0, 0), (j, 0)), constant_values=-1)[:, :s]
            xj = jnp.where((sj == segments_BS)[..., None], xj, 0)
        wj = w_J[j].astype(jnp.float32)
        if heads is None:
            y = y + xj * wj
        else:
            xj = xj.reshape(b, s, heads, c // heads)
            y = y + jnp.einsum("bsni,nio->bsno", xj, wj).reshape(b, s, c)
    return y.astype(x_BSC.dtype)


class CompressedConvAttention(Attention):
    """CCA / CCGQA (module docstring). Parameters: ``q`` [D, N, h], ``k`` / ``v`` [D, K, h],
    ``o`` [N, h, D] (those of :class:`Attention` at head dim h), ``q_conv1`` [k, N·h],
    ``q_conv2`` [k, N, h, h], ``k_conv1`` [k, K·h], ``k_conv2`` [k, K, h, h], ``key_temperature``
    (scalar)."""

    def __init__(self, config: CCAConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config
        n, k, h, w = c.n_q, c.n_kv, c.h, c.conv_kernel
        if c.convs:

            def depthwise(width):  # identity at birth: w[0] = 1
                init = lambda key, shape, dt: jnp.zeros(shape, dt).at[0].set(1)
                return param(rngs, (w, width), (None, None), init=init, dtype=c.param_dtype)

            def mixing(heads):  # identity at birth: w[0] = I per head
                eye = jnp.broadcast_to(jnp.eye(h), (heads, h, h))
                init = lambda key, shape, dt: jnp.zeros(shape, dt).at[0].set(eye.astype(dt))
                return param(rngs, (w, heads, h, h), (None, None, None, None), init=init,
                             dtype=c.param_dtype)  # fmt: skip

            self.q_conv1, self.q_conv2 = depthwise(n * h), mixing(n)
            self.k_conv1, self.k_conv2 = depthwise(k * h), mixing(k)
        if c.qk_l2_norm:
            init = lambda key, shape, dt: jnp.full(shape, h**0.5, dt)
            self.key_temperature = param(rngs, (), (), init=init, dtype=c.param_dtype)

    # -- stages ----------------------------------------------------------------------------
    def project(self, x_BTD: jax.Array, ctx: Context):
        """The down-projections: q̃ [B, T, N, h] and (k̃ [B, T, K, h], ṽ [B, T, K, h])."""
        return super().project(x_BTD, ctx)

    def qk_transform(self, q, kv, ctx: Context):
        """Identity: CCA's transforms read earlier tokens, so they run in ``attention_inputs``
        (the sequence itself) and ``attend_cache`` (with the cache's history)."""
        return q, kv

    def _features(self, q_BTNH, kv):
        b, t = q_BTNH.shape[:2]
        k_BTKH, v_BTKV = kv
        return jnp.concatenate(
            [q_BTNH.reshape(b, t, -1), k_BTKH.reshape(b, t, -1), v_BTKV.reshape(b, t, -1)], -1
        )

    def _mix(self, feats_BSC, t: int, positions_BT, segments_BS=None):
        """The last ``t`` tokens' (q, k, v) from features [B, S, C] of S >= t tokens (the
        earlier ones are history: the convs' and the value shift's context)."""
        c = self.config
        n, k, h = c.n_q, c.n_kv, c.h
        b, s, _ = feats_BSC.shape
        qf, kf, vf = jnp.split(feats_BSC, [n * h, n * h + k * h], axis=-1)
        if c.value_shift:  # channel half 2 from the previous token
            half = k * h // 2
            prev = jnp.pad(vf[:, :, half:], ((0, 0), (1, 0), (0, 0)))[:, :s]
            if segments_BS is not None:  # not across a packed sequence boundary
                same = jnp.pad(segments_BS, ((0, 0), (1, 0)), constant_values=-1)[:, :s]
                prev = jnp.where((same == segments_BS)[..., None], prev, 0)
            vf = jnp.concatenate([vf[:, :, :half], prev], -1)
        q_pre, k_pre = qf, kf
        if c.convs:
            conv = lambda x, w, heads=None: causal_conv(x, w, heads=heads, segments_BS=segments_BS)
            qf = conv(conv(qf, self.q_conv1[...]), self.q_conv2[...], n)
            kf = conv(conv(kf, self.k_conv1[...]), self.k_conv2[...], k)
        last = lambda x, heads: x[:, s - t :].reshape(b, t, heads, h)
        q_BTNH, k_BTKH, v_BTKV = last(qf, n), last(kf, k), last(vf, k)
        if c.qk_mean:
            q0, k0 = last(q_pre, n), last(k_pre, k)
            g = n // k
            q_BTNH = q_BTNH + 0.5 * jnp.repeat(k0, g, axis=2)
            k_BTKH = k_BTKH + 0.5 * q0.reshape(b, t, k, g, h).mean(3)
        if c.qk_l2_norm:
            q_BTNH = _l2(q_BTNH)
            k_BTKH = _l2(k_BTKH) * self.key_temperature[...].astype(k_BTKH.dtype)
        if c.rope is not None:
            dt = q_BTNH.dtype
            q_BTNH = apply_rope(q_BTNH, positions_BT, c.rope).astype(dt)
            k_BTKH = apply_rope(k_BTKH, positions_BT, c.rope).astype(dt)
        return q_BTNH, k_BTKH, v_BTKV

    def attention_inputs(self, q_BTNH, kv, ctx: Context):
        """(q, k, v) of the sequence itself: convs, value shift (within ``ctx.segment_ids``),
        qk-mean, L2 norm, RoPE."""
        t = q_BTNH.shape[1]
        seg = ctx.segment_ids_BT
        return self._mix(self._features(q_BTNH, kv), t, ctx.positions_BT, seg)

    def attend_cache(self, q_BTNH, kv, cache: HistoryKVCache, ctx: Context, *, num_new_B=None):
        """(q, k, v) of the new tokens after the cache's history; the cache attends and stores
        them and keeps the last tokens' features -> (o_BTNV, cache)."""
        t = q_BTNH.shape[1]
        full = jnp.concatenate(
            [cache.history_BRC.astype(q_BTNH.dtype), self._features(q_BTNH, kv)], axis=1
        )
        q, k, v_ = self._mix(full, t, ctx.positions_BT)
        o, cache = cache.update_and_attend(q, k, v_, num_new_B=num_new_B, **self._op_args(ctx))
        return o, cache.with_history(full, num_new_B)

    def init_cache(
        self, batch: int, capacity: int, dtype=jnp.bfloat16, cache=None
    ) -> HistoryKVCache:
        """A :class:`HistoryKVCache`: a dense K·h + K·h cache and 2(k - 1) tokens of features
        (float32: they feed the convolutions of later tokens)."""
        c = self.config
        kv = KVCache.create(
            batch=batch, capacity=capacity, num_kv_heads=c.n_kv, head_dim=c.h, dtype=dtype,
            config=self.cache_config(cache),
        )  # fmt: skip
        channels = (c.n_q + 2 * c.n_kv) * c.h
        return HistoryKVCache.create(kv, history=c.history, channels=channels)


def _l2(x):
    # normalise in fp32: bf16 sums of squares lose the small heads' precision
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + 1e-12)).astype(x.dtype)
