"""Dense K/V cache for MHA / GQA / MQA / SQA: K·H + K_v·V numbers per token per layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import _SlotsMixin, write_rows

__all__ = ["KVCache"]


@struct.dataclass
class KVCache(_SlotsMixin):
    """Fixed-size per-layer key/value cache with per-sequence lengths and a policy.

    Attributes:
      k_BCKH: keys [B, C, K, H] (already rotated by RoPE), in the storage dtype.
      v_BCKV: values [B, C, K_v, V] (K_v value heads; K_v = K unless asked).
      lengths_B: int32 [B] tokens seen per sequence (the next token's position).
      sink, window: the policy (static): window 0 keeps every token (C = capacity), else a
        ring of C = sink + window slots (see ``jaxattn.cache``).
    """

    k_BCKH: jax.Array
    v_BCKV: jax.Array
    lengths_B: jax.Array
    sink: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(
        cls,
        *,
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        num_v_heads: int | None = None,
        dtype=jnp.bfloat16,
        config=None,
    ) -> KVCache:
        """An empty cache.

        Args:
          batch: B.
          capacity: the most positions a sequence can hold (full policy; a ring ignores it).
          num_kv_heads: K, key heads.
          head_dim: H, key head dim.
          v_head_dim: V, value head dim (default H).
          num_v_heads: K_v, value heads (default K).
          dtype: storage dtype (``config.dtype`` wins when set).
          config: a ``CacheConfig`` (format "dense" or None; default: full policy).

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
        sink, window, dtype = _policy(config, "dense", dtype)
        slots = sink + window if window else capacity
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
        return cls(
            k_BCKH=jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype),
            v_BCKV=jnp.zeros((batch, slots, num_v_heads, v_head_dim), dtype),
            lengths_B=jnp.zeros((batch,), jnp.int32),
            sink=sink,
            window=window,
        )

    @property
    def capacity(self) -> int:
        """C, slots per sequence."""
        return self.k_BCKH.shape[1]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this layer's cache: (K·H + K_v·V)·itemsize. A ring's
        whole buffer is C of these whatever the sequence length."""
        _, _, k, h = self.k_BCKH.shape
        _, _, kv, v = self.v_BCKV.shape
        return k * h * self.k_BCKH.dtype.itemsize + kv * v * self.v_BCKV.dtype.itemsize

    def _check_new(self, k_BTKH, v_BTKV):
        if k_BTKH.shape[2:] != self.k_BCKH.shape[2:] or v_BTKV.shape[2:] != self.v_BCKV.shape[2:]:
            raise ValueError(
                f"new k {k_BTKH.shape} / v {v_BTKV.shape} do not match the cache "
                f"k {self.k_BCKH.shape} / v {self.v_BCKV.shape}"
            )

    def write(self, k_BTKH: jax.Array, v_BTKV: jax.Array, num_new_B=None) -> KVCache:
        """Store T new keys/values at the slots of positions ``lengths_B[b]...``; lengths are
        unchanged (``advance`` counts them).

        Args:
          k_BTKH: new keys [B, T, K, H].
          v_BTKV: new values [B, T, K_v, V].
          num_new_B: store only the first ``num_new_B[b]`` rows (default all T).

        Returns:
          The updated cache.
        """
        self._check_new(k_BTKH, v_BTKV)
        kw = dict(sink=self.sink, window=self.window)
        return self.replace(
            k_BCKH=write_rows(self.k_BCKH, k_BTKH, self.lengths_B, num_new_B, **kw),
            v_BCKV=write_rows(self.v_BCKV, v_BTKV, self.lengths_B, num_new_B, **kw),
        )

    def update_and_attend(
        self, q_BTNH, k_BTKH, v_BTKV, *, num_new_B=None, mask=None, **op_kwargs
    ) -> tuple[jax.Array, KVCache]:
        """Attend T new queries over the cache and the new tokens; store and count them.

        Token t of sequence b is at position ``lengths_B[b] + t``.

        Args:
          q_BTNH: queries [B, T, N, H] (rotated at those positions).
          k_BTKH, v_BTKV: the new tokens' keys [B, T, K, H] and values [B, T, K_v, V].
          num_new_B: valid new tokens per sequence (default T): trailing padding is neither
            stored in a ring nor counted.
          mask: the layer's mask spec on absolute positions (Causal, or a causal
            SlidingWindow for a full cache).
          op_kwargs: further ``dot_product_attention`` arguments (scale, logits_soft_cap,
            implementation, dropout...).

        Returns:
          (o_BTNV in q's dtype, the cache with the new tokens stored and counted).

        Raises:
          ValueError: a full cache would overflow (static T or concrete lengths; see
            ``jaxattn.cache`` for traced lengths).
        """
        self._check_new(k_BTKH, v_BTKV)
        o, (k, v) = self._attend_and_write(
            q_BTNH,
            (self.k_BCKH, self.v_BCKV),
            (k_BTKH, v_BTKV),
            num_new_B,
            mask=mask,
            **op_kwargs,
        )
        t = q_BTNH.shape[1]
        cache = self.replace(k_BCKH=k, v_BCKV=v)
        return o, cache.advance(t if num_new_B is None else num_new_B)


def _policy(config, fmt: str, dtype):
    """(sink, window, dtype) of a CacheConfig (None: full, ``dtype``)."""
    if config is None:
        return 0, 0, dtype
    if config.format not in (None, fmt):
        raise ValueError(f"cache.format={config.format!r} cannot be stored in a {fmt} cache")
    if config.policy == "full":
        return 0, 0, config.storage_dtype(dtype)
    return config.sink, config.window, config.storage_dtype(dtype)
