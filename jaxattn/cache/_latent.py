"""MLA latent cache (DeepSeek-V2): L + P numbers per token per layer.

Each slot holds the normalised KV latent c (L = kv_lora_rank numbers, shared by all heads) and
the decoupled RoPE key k_rope (P = qk_rope_head_dim numbers, one key shared by all heads), packed
as one row ``[c | k_rope]`` of R = L + P numbers. Decoding attends over this row directly: it is
the single key (and, its first L numbers, the single value) of an MQA problem whose queries have
the key up-projection absorbed (see ``jaxattn.layers.MultiHeadLatentAttention``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import write_rows

__all__ = ["LatentCache"]


@struct.dataclass
class LatentCache:
    """Fixed-capacity per-layer latent cache with per-sequence lengths.

    Attributes:
      latent_BCR: packed rows [B, C, L + P]: latent c then the rotated rope key.
      lengths_B: int32 [B] valid slots per sequence.
      kv_lora_rank: L (static).
    """

    latent_BCR: jax.Array
    lengths_B: jax.Array
    kv_lora_rank: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(
        cls, *, batch: int, capacity: int, kv_lora_rank: int, rope_dim: int, dtype=jnp.bfloat16
    ) -> LatentCache:
        """An empty latent cache [B, C, L + P] with zero lengths."""
        for name, val in (
            ("batch", batch),
            ("capacity", capacity),
            ("kv_lora_rank", kv_lora_rank),
            ("rope_dim", rope_dim),
        ):
            if int(val) <= 0:
                raise ValueError(f"{name}={val} must be positive")
        return cls(
            latent_BCR=jnp.zeros((batch, capacity, kv_lora_rank + rope_dim), dtype),
            lengths_B=jnp.zeros((batch,), jnp.int32),
            kv_lora_rank=int(kv_lora_rank),
        )

    @property
    def capacity(self) -> int:
        """C, slots per sequence."""
        return self.latent_BCR.shape[1]

    @property
    def rope_dim(self) -> int:
        """P, the decoupled rope key width."""
        return self.latent_BCR.shape[-1] - self.kv_lora_rank

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this layer's cache: (L + P)·itemsize."""
        return self.latent_BCR.shape[-1] * self.latent_BCR.dtype.itemsize

    def write(self, c_BTL: jax.Array, k_rope_BTP: jax.Array) -> LatentCache:
        """Store T new latents and rope keys at slots ``lengths_B[b]...``; lengths unchanged."""
        if c_BTL.shape[-1] != self.kv_lora_rank or k_rope_BTP.shape[-1] != self.rope_dim:
            raise ValueError(
                f"latent {c_BTL.shape} / rope key {k_rope_BTP.shape} do not match the cache "
                f"L={self.kv_lora_rank}, P={self.rope_dim}"
            )
        row_BTR = jnp.concatenate([c_BTL, k_rope_BTP.astype(c_BTL.dtype)], axis=-1)
        return self.replace(latent_BCR=write_rows(self.latent_BCR, row_BTR, self.lengths_B))

    def advance(self, num_new_B: jax.Array | int) -> LatentCache:
        """Count ``num_new_B`` more valid slots per sequence (int or int [B])."""
        return self.replace(lengths_B=self.lengths_B + jnp.asarray(num_new_B, jnp.int32))

    def with_lengths(self, lengths_B: jax.Array) -> LatentCache:
        """The same buffer with ``lengths_B`` valid slots per sequence."""
        return self.replace(
            lengths_B=jnp.broadcast_to(jnp.asarray(lengths_B, jnp.int32), self.lengths_B.shape)
        )
