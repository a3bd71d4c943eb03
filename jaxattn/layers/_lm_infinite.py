"""LM-Infinite (arXiv 2308.16137): the ``"lm_infinite"`` kind.

The ``"mha"`` kind (RoPE required) whose op is :func:`jaxattn.ops.lm_infinite.
lm_infinite_attention`: a Λ-shaped mask (``n_global`` starting keys and a window of
``n_local``) and RoPE distances capped at ``n_local``, training-free. Same parameters as
``"mha"`` (a checkpoint of one loads into the other). Decoding stores rotated keys in a full
dense ``KVCache`` and runs the same function over the stored keys (it reads the cache's
buffers: the sink branch needs the first keys, which ``update_and_attend`` does not expose).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import _validate as val
from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import register_kind
from jaxattn.ops.lm_infinite import lm_infinite_attention
from jaxattn.ops.rope import apply_rope

__all__ = ["LMInfiniteConfig", "LMInfiniteAttention"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMInfiniteConfig(AttentionConfig):
    """:class:`AttentionConfig` plus LM-Infinite's Λ mask (the ``"lm_infinite"`` kind).

    Attributes:
      n_global: starting (sink) keys every query sees (paper: 10).
      n_local: the local window and the distance cap (paper: the pre-training length).
    """

    kind: ClassVar[str] = "lm_infinite"

    n_global: int = 10
    n_local: int = 4096

    def __post_init__(self):
        super().__post_init__()
        o = type(self).__name__
        val.check_int(o, "n_global", self.n_global, minimum=0)
        val.check_int(o, "n_local", self.n_local)
        if self.rope is None:
            raise ValueError(f"{o}: rope is required (the distance cap acts on RoPE positions)")
        self._refuse_own_mask_options("LM-Infinite")

    def build(self, *, rngs: nnx.Rngs) -> LMInfiniteAttention:
        """The :class:`LMInfiniteAttention` module of this config."""
        return LMInfiniteAttention(self, rngs=rngs)


register_kind("lm_infinite", LMInfiniteConfig)


class LMInfiniteAttention(Attention):
    """GQA attention with LM-Infinite's Λ mask and distance cap (module docstring)."""

    def qk_transform(self, q_BTNH, kv, ctx: Context):
        """qk-norm, RoPE; also keeps the unrotated queries (the sink branch rotates them)."""
        c = self.config
        k, v = kv
        if c.qk_norm:
            q_BTNH, k = self.q_norm(q_BTNH), self.k_norm(k)
        dt = q_BTNH.dtype
        q_rot = apply_rope(q_BTNH, ctx.positions_BT, c.rope).astype(dt)
        k_rot = apply_rope(k, ctx.positions_BT, c.rope).astype(dt)
        return q_rot, (k_rot, v, q_BTNH)

    def _op(self, q, kv_raw_q, k, v, **kw):
        c = self.config
        return lm_infinite_attention(
            q,
            kv_raw_q,
            k,
            v,
            rope=c.rope,
            n_global=c.n_global,
            n_local=c.n_local,
            scale=c.softmax_scale,
            implementation=c.implementation,
            **kw,
        )

    def attend(self, q_BTNH, kv, ctx: Context) -> jax.Array:
        """LM-Infinite over the sequence itself."""
        if ctx.segment_ids_BT is not None:
            raise NotImplementedError("the 'lm_infinite' kind does not serve packed segments")
        k, v, q_raw = kv
        return self._op(q_BTNH, q_raw, k, v)

    def attention_inputs(self, q, kv, ctx: Context):
        raise NotImplementedError("the 'lm_infinite' kind has no single attention op for hooks")

    def attend_cache(self, q_BTNH, kv, cache, ctx: Context, *, num_new_B=None):
        """Store the new rotated keys/values, then attend over every stored position."""
        k, v, q_raw = kv
        start_B = cache.lengths_B
        t = q_BTNH.shape[1]
        cache = cache.write(k.astype(cache.k_BCKH.dtype), v.astype(cache.v_BCKV.dtype), num_new_B)
        dt = cache.k_BCKH.dtype
        o = self._op(
            q_BTNH.astype(dt),
            q_raw.astype(dt),
            cache.k_BCKH,
            cache.v_BCKV,
            q_offset=start_B,
            kv_lengths=jnp.minimum(start_B + t, cache.capacity),
        )
        return o.astype(q_BTNH.dtype), cache.advance(t if num_new_B is None else num_new_B)
