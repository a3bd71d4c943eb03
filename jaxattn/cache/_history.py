"""A KV cache plus each sequence's last R tokens of a layer's pre-attention features.

Layers whose queries / keys / values mix a short causal window of tokens before attention
(CCA's sequence convolutions and value shift, ``jaxattn.layers._cca``) need, at a decode step,
the features of the R tokens before the new ones. :class:`HistoryKVCache` holds them beside a
:class:`KVCache`: ``history_BRC`` [B, R, C] (zeros before the first token, which is exactly the
zero padding of the full forward's causal convolutions), advanced per sequence by
``with_history``. Attention, lengths, positions, capacity and ``bytes_per_token`` are the inner
cache's; the history is a fixed R·C numbers per sequence (``history_bytes``), whatever the
context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._dense import KVCache

__all__ = ["HistoryKVCache"]


@struct.dataclass
class HistoryKVCache:
    """``kv`` (a :class:`KVCache`) and ``history_BRC``, the last R tokens' features."""

    kv: KVCache
    history_BRC: jax.Array

    @classmethod
    def create(cls, kv: KVCache, *, history: int, channels: int, dtype=jnp.float32):
        """``kv`` with an empty (zero) history of ``history`` tokens x ``channels``."""
        for name, val in (("history", history), ("channels", channels)):
            if int(val) <= 0:
                raise ValueError(f"HistoryKVCache.create: {name}={val} must be positive")
        b = kv.lengths_B.shape[0]
        return cls(kv=kv, history_BRC=jnp.zeros((b, history, channels), dtype))

    @property
    def lengths_B(self) -> jax.Array:
        """Tokens seen per sequence."""
        return self.kv.lengths_B

    @property
    def max_positions(self):
        """The inner cache's."""
        return self.kv.max_positions

    def positions_BT(self, t: int) -> jax.Array:
        """Positions [B, T] of the next T tokens."""
        return self.kv.positions_BT(t)

    def key_positions_BC(self) -> jax.Array:
        """The inner cache's slot positions."""
        return self.kv.key_positions_BC()

    def check_room(self, needed: int) -> None:
        """The inner cache's check."""
        self.kv.check_room(needed)

    def bytes_per_token(self) -> int:
        """The inner cache's bytes per token (the history does not grow with the context)."""
        return self.kv.bytes_per_token()

    def history_bytes(self) -> int:
        """Bytes of the fixed history, R·C per sequence."""
        return self.history_BRC.size * self.history_BRC.dtype.itemsize

    def advance(self, num_new_B):
        """Count ``num_new_B`` more tokens (the history is advanced by ``with_history``)."""
        return self.replace(kv=self.kv.advance(num_new_B))

    def with_lengths(self, lengths_B):
        """The inner cache with ``lengths_B`` tokens counted."""
        return self.replace(kv=self.kv.with_lengths(lengths_B))

    def with_history(self, full_BSC: jax.Array, num_new_B=None):
        """The history after the new tokens: ``full_BSC`` is the old history followed by the T
        new tokens' features [B, R + T, C]; each sequence keeps the R rows ending after its
        ``num_new_B[b]`` valid new tokens (default T)."""
        b, s, _ = full_BSC.shape
        r = self.history_BRC.shape[1]
        n_B = jnp.broadcast_to(jnp.asarray(s - r if num_new_B is None else num_new_B), (b,))

        def rows(x_SC, n):
            return jax.lax.dynamic_slice_in_dim(x_SC, n, r, axis=0)

        new = jax.vmap(rows)(full_BSC, n_B.astype(jnp.int32))
        return self.replace(history_BRC=new.astype(self.history_BRC.dtype))

    def update_and_attend(self, q_BTNH, k_BTKH, v_BTKV, **kwargs):
        """The inner cache attends and stores (``KVCache.update_and_attend``) -> (o, cache)."""
        o, kv = self.kv.update_and_attend(q_BTNH, k_BTKH, v_BTKV, **kwargs)
        return o, self.replace(kv=kv)
