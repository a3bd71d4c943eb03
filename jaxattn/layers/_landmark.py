"""Landmark attention (arXiv 2305.16300): the ``"landmark"`` kind.

The ``"mha"`` kind whose op is :func:`jaxattn.ops.landmark.landmark_attention`: the
sequence's every ``block``-th token (positions p with p % block == block - 1) is a block's
landmark, attention uses the paper's grouped softmax, and ``top_k`` (None in training: every
earlier block) retrieves the blocks with the highest landmark scores. Placing the landmark
token there is the data's job (the paper inserts one after every ``block - 1`` tokens); the
layer only reads the positions. Same parameters as ``"mha"``.

Differences from the paper: keys keep their absolute RoPE positions at retrieval (the paper's
long-context inference re-positions the retrieved blocks); with GQA the blocks are retrieved
per kv head (the largest landmark probability over the group's query heads). Decoding stores
keys in a full dense ``KVCache`` and runs the same function over the stored keys.
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
from jaxattn.ops.landmark import landmark_attention

__all__ = ["LandmarkConfig", "LandmarkAttention"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LandmarkConfig(AttentionConfig):
    """:class:`AttentionConfig` plus landmark attention's blocks (the ``"landmark"`` kind).

    Attributes:
      block: tokens per block, its landmark included (paper: 50 + 1).
      top_k: earlier blocks retrieved per query, or None for all (the training form).
    """

    kind: ClassVar[str] = "landmark"

    block: int = 51
    top_k: int | None = None

    def __post_init__(self):
        super().__post_init__()
        o = type(self).__name__
        val.check_int(o, "block", self.block, minimum=2)
        if self.top_k is not None:
            val.check_int(o, "top_k", self.top_k)
        self._refuse_own_mask_options("landmark-attention")

    def build(self, *, rngs: nnx.Rngs) -> LandmarkAttention:
        """The :class:`LandmarkAttention` module of this config."""
        return LandmarkAttention(self, rngs=rngs)


register_kind("landmark", LandmarkConfig)


class LandmarkAttention(Attention):
    """GQA attention with landmark blocks and the grouped softmax (module docstring)."""

    def _op(self, q, k, v, **kw):
        c = self.config
        return landmark_attention(
            q,
            k,
            v,
            block=c.block,
            top_k=None if c.top_k is None else min(c.top_k, k.shape[1] // c.block) or None,
            scale=c.softmax_scale,
            implementation=c.implementation,
            **kw,
        )

    def attend(self, q_BTNH, kv, ctx: Context) -> jax.Array:
        """Landmark attention over the sequence itself."""
        if ctx.segment_ids_BT is not None:
            raise NotImplementedError("the 'landmark' kind does not serve packed segments")
        return self._op(q_BTNH, *kv)

    def attention_inputs(self, q, kv, ctx: Context):
        raise NotImplementedError("the 'landmark' kind has no single attention op for hooks")

    def attend_cache(self, q_BTNH, kv, cache, ctx: Context, *, num_new_B=None):
        """Store the new keys/values, then attend over every stored position."""
        k, v = kv
        start_B = cache.lengths_B
        t = q_BTNH.shape[1]
        cache = cache.write(k.astype(cache.k_BCKH.dtype), v.astype(cache.v_BCKV.dtype), num_new_B)
        dt = cache.k_BCKH.dtype
        o = self._op(
            q_BTNH.astype(dt),
            cache.k_BCKH,
            cache.v_BCKV,
            q_offset=start_B,
            kv_lengths=jnp.minimum(start_B + t, cache.capacity),
        )
        return o.astype(q_BTNH.dtype), cache.advance(t if num_new_B is None else num_new_B)
