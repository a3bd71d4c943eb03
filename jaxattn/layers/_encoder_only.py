"""The base of attention kinds that their papers define on whole, bidirectional sequences
only (Linformer, Agent Attention): each output depends on later tokens, so there is no cache,
no decoding and no packed-sequence form, and the layer refuses them with the kind's reason."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxattn.layers._context import Context
from jaxattn.layers._kinds import AttentionLayer

__all__ = ["EncoderOnlyAttention"]


class EncoderOnlyAttention(AttentionLayer):
    """An :class:`AttentionLayer` for whole sequences: ``out`` is the ``o`` Linear,
    ``init_cache`` / ``attend_cache`` / ``decode`` raise NotImplementedError with
    ``no_decoding_reason``, and ``refuse_segments(ctx)`` (called by ``attend``) raises it for
    packed sequences with ``segments_reason``."""

    no_decoding_reason: ClassVar[str]
    segments_reason: ClassVar[str]

    def out(self, o_BTNH: jax.Array, ctx: Context) -> jax.Array:
        """o projection [B, T, N, H] -> [B, T, D]."""
        return self.o(o_BTNH, ctx)

    def refuse_segments(self, ctx: Context) -> None:
        """Raise NotImplementedError when ``ctx`` carries segment ids (packed sequences)."""
        if ctx.segment_ids_BT is not None:
            raise NotImplementedError(
                f"{type(self).__name__} cannot serve segment_ids (packed sequences): "
                f"{self.segments_reason}"
            )

    def _no_decoding(self):
        raise NotImplementedError(
            f"{type(self).__name__} has no cache and no decode: {self.no_decoding_reason}; "
            "call the layer on the whole sequence"
        )

    def init_cache(self, batch: int, capacity: int, dtype=jnp.bfloat16, cache=None):
        """Refused (module docstring). Raises NotImplementedError."""
        self._no_decoding()

    def attend_cache(self, q, kv, cache, ctx: Context, *, num_new_B=None):
        """Refused (module docstring). Raises NotImplementedError."""
        self._no_decoding()

    def decode(self, x_BTD, cache, ctx=None, *, num_new_B=None):
        """Refused (module docstring). Raises NotImplementedError."""
        self._no_decoding()
