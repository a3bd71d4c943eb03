"""Dense K/V cache for MHA / GQA / MQA / SQA: 2·K·H numbers per token per layer (H = V)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import write_rows

__all__ = ["KVCache"]


@struct.dataclass
class KVCache:
    """Fixed-capacity per-layer key/value cache with per-sequence lengths.

    Attributes:
      k_BCKH: keys [B, C, K, H] (already rotated by RoPE).
      v_BCKV: values [B, C, K, V].
      lengths_B: int32 [B] valid slots per sequence.
    """

    k_BCKH: jax.Array
    v_BCKV: jax.Array
    lengths_B: jax.Array

    @classmethod
    def create(
        cls,
        *,
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        dtype=jnp.bfloat16,
    ) -> KVCache:
        """An empty cache.

        Args:
          batch: B.
          capacity: C, the most positions a sequence can hold.
          num_kv_heads: K.
          head_dim: H, key head dim.
          v_head_dim: V, value head dim (default H).
          dtype: storage dtype.

        Returns:
          KVCache with zero buffers and zero lengths.
        """
        for name, val in (
            ("batch", batch),
            ("capacity", capacity),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if int(val) <= 0:
                raise ValueError(f"{name}={val} must be positive")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        return cls(
            k_BCKH=jnp.zeros((batch, capacity, num_kv_heads, head_dim), dtype),
            v_BCKV=jnp.zeros((batch, capacity, num_kv_heads, v_head_dim), dtype),
            lengths_B=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        """C, slots per sequence."""
        return self.k_BCKH.shape[1]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this layer's cache: K·(H + V)·itemsize."""
        _, _, k, h = self.k_BCKH.shape
        v = self.v_BCKV.shape[-1]
        return k * h * self.k_BCKH.dtype.itemsize + k * v * self.v_BCKV.dtype.itemsize

    def write(self, k_BTKH: jax.Array, v_BTKV: jax.Array) -> KVCache:
        """Store T new keys/values at slots ``lengths_B[b]...``; lengths are unchanged.

        Args:
          k_BTKH: new keys [B, T, K, H].
          v_BTKV: new values [B, T, K, V].

        Returns:
          The updated cache.
        """
        if k_BTKH.shape[2:] != self.k_BCKH.shape[2:] or v_BTKV.shape[2:] != self.v_BCKV.shape[2:]:
            raise ValueError(
                f"new k {k_BTKH.shape} / v {v_BTKV.shape} do not match the cache "
                f"k {self.k_BCKH.shape} / v {self.v_BCKV.shape}"
            )
        return self.replace(
            k_BCKH=write_rows(self.k_BCKH, k_BTKH, self.lengths_B),
            v_BCKV=write_rows(self.v_BCKV, v_BTKV, self.lengths_B),
        )

    def advance(self, num_new_B: jax.Array | int) -> KVCache:
        """Count ``num_new_B`` more valid slots per sequence (int or int [B])."""
        return self.replace(lengths_B=self.lengths_B + jnp.asarray(num_new_B, jnp.int32))

    def with_lengths(self, lengths_B: jax.Array) -> KVCache:
        """The same buffers with ``lengths_B`` valid slots per sequence."""
        return self.replace(
            lengths_B=jnp.broadcast_to(jnp.asarray(lengths_B, jnp.int32), self.lengths_B.shape)
        )
