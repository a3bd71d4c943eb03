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

from jaxattn.cache._base import _SlotsMixin, write_rows
from jaxattn.cache._dense import _policy

__all__ = ["LatentCache"]


@struct.dataclass
class LatentCache(_SlotsMixin):
    """Fixed-size per-layer latent cache with per-sequence lengths and a policy.

    Attributes:
      latent_BCR: packed rows [B, C, L + P]: latent c then the rotated rope key.
      lengths_B: int32 [B] tokens seen per sequence (the next token's position).
      kv_lora_rank: L (static).
      sink, window: the policy (static), as in ``KVCache``.
    """

    latent_BCR: jax.Array
    lengths_B: jax.Array
    kv_lora_rank: int = struct.field(pytree_node=False, default=0)
    sink: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(
        cls,
        *,
        batch: int,
        capacity: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype=jnp.bfloat16,
        config=None,
    ) -> LatentCache:
        """An empty latent cache [B, C, L + P] with zero lengths (``config``: a
        ``CacheConfig`` of format "latent" or None; a ring ignores ``capacity``)."""
        for name, val in (
            ("batch", batch),
            ("capacity", capacity),
            ("kv_lora_rank", kv_lora_rank),
            ("rope_dim", rope_dim),
        ):
            if int(val) <= 0:
                raise ValueError(f"{name}={val} must be positive")
        sink, window, dtype = _policy(config, "latent", dtype)
        slots = sink + window if window else capacity
        return cls(
            latent_BCR=jnp.zeros((batch, slots, kv_lora_rank + rope_dim), dtype),
            lengths_B=jnp.zeros((batch,), jnp.int32),
            kv_lora_rank=int(kv_lora_rank),
            sink=sink,
            window=window,
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

    def _row(self, c_BTL, k_rope_BTP):
        if c_BTL.shape[-1] != self.kv_lora_rank or k_rope_BTP.shape[-1] != self.rope_dim:
            raise ValueError(
                f"latent {c_BTL.shape} / rope key {k_rope_BTP.shape} do not match the cache "
                f"L={self.kv_lora_rank}, P={self.rope_dim}"
            )
        return jnp.concatenate([c_BTL, k_rope_BTP.astype(c_BTL.dtype)], axis=-1)

    def write(self, c_BTL: jax.Array, k_rope_BTP: jax.Array, num_new_B=None) -> LatentCache:
        """Store T new latents and rope keys at the slots of positions ``lengths_B[b]...``;
        lengths unchanged."""
        row_BTR = self._row(c_BTL, k_rope_BTP)
        kw = dict(sink=self.sink, window=self.window)
        return self.replace(
            latent_BCR=write_rows(self.latent_BCR, row_BTR, self.lengths_B, num_new_B, **kw)
        )

    def update_and_attend(
        self, q_BTNR, c_BTL, k_rope_BTP, *, num_new_B=None, mask=None, **op_kwargs
    ) -> tuple[jax.Array, LatentCache]:
        """Absorbed-MLA attention: T new queries over the stored rows and the new ones.

        Each row ``[c | k_rope]`` is the one key and the one value (MQA, K = 1) of the queries
        ``[q_nope·Wk_nᵀ | q_pe]``; the layer keeps the first L output numbers.

        Args:
          q_BTNR: absorbed queries [B, T, N, L + P] at positions ``lengths_B[b] + t``.
          c_BTL: new latents [B, T, L]; k_rope_BTP: their rotated rope keys [B, T, P].
          num_new_B, mask, op_kwargs: as in ``KVCache.update_and_attend``.

        Returns:
          (o_BTNR in q's dtype, the cache with the new rows stored and counted).
        """
        row_BT1R = self._row(c_BTL, k_rope_BTP)[:, :, None, :]
        # The value is the whole row too (the very same array as the key; the op reads it once):
        # passing a latent slice row[..., :L] instead would copy the whole cache every step.
        o, (row, _) = self._attend_and_write(
            q_BTNR,
            (self.latent_BCR[:, :, None, :], None),
            (row_BT1R, None),
            num_new_B,
            mask=mask,
            **op_kwargs,
        )
        t = q_BTNR.shape[1]
        cache = self.replace(latent_BCR=row[:, :, 0, :])
        return o, cache.advance(t if num_new_B is None else num_new_B)
