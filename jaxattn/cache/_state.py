"""Recurrent-state cache for linear attention: a fixed-size state whatever the context length.

A linear-attention layer (``jaxattn.layers.LinearAttention``, kind ``"linear"``) summarises every
token it has seen in one state per kv head, S [B, K, H, V] (V + 1 with normalisation), so its
"cache" holds that state and the token counts, and decoding costs the same at any context
length. The cache protocol is the one of ``jaxattn.cache``: ``update_and_attend`` attends the
new queries over the state and the new tokens and folds the new tokens into the state
(``jaxattn.ops.linear_attention``: the chunked form for several tokens, the recurrent form
for one), ``lengths_B`` / ``positions_BT`` / ``advance`` / ``with_lengths`` count tokens, and
``check_room`` always passes (nothing overflows). It has no slots: ``key_positions_BC`` is empty
and ``bytes_per_token`` is 0; ``state_bytes`` is the fixed size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import positions_BT as _positions_BT
from jaxattn.ops.linear_attention import linear_attention, retention_log_decay

__all__ = ["LinearStateCache"]


@struct.dataclass
class LinearStateCache:
    """The recurrent state of one linear-attention layer.

    Attributes:
      state_BKHV: the state [B, K, H, V'] (float32 unless the layer's CacheConfig says
        otherwise: it is a running sum, which bf16 storage would round at every step).
      lengths_B: int32 [B] tokens seen per sequence.
    """

    state_BKHV: jax.Array
    lengths_B: jax.Array

    @classmethod
    def create(cls, *, batch: int, num_kv_heads: int, head_dim: int, state_dim: int, dtype=None):
        """An empty (zero) state.

        Args:
          batch: B; num_kv_heads: K; head_dim: H; state_dim: V' (V, or V + 1 normalised).
          dtype: storage dtype (default float32).
        """
        for name, val in (
            ("batch", batch),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("state_dim", state_dim),
        ):
            if int(val) <= 0:
                raise ValueError(f"{name}={val} must be positive")
        shape = (batch, num_kv_heads, head_dim, state_dim)
        return cls(
            state_BKHV=jnp.zeros(shape, jnp.float32 if dtype is None else dtype),
            lengths_B=jnp.zeros((batch,), jnp.int32),
        )

    max_positions = None  # unbounded: the state never fills

    def positions_BT(self, t: int) -> jax.Array:
        """Positions [B, T] of the next T tokens."""
        return _positions_BT(self.lengths_B, t)

    def key_positions_BC(self) -> jax.Array:
        """No slots: int32 [B, 0]."""
        return jnp.zeros((self.lengths_B.shape[0], 0), jnp.int32)

    def check_room(self, needed: int) -> None:
        """Any number of tokens can be decoded."""

    def bytes_per_token(self) -> int:
        """0: a token adds nothing to the fixed-size state (see ``state_bytes``)."""
        return 0

    def state_bytes(self) -> int:
        """Bytes of the whole state, independent of the context length."""
        return self.state_BKHV.size * self.state_BKHV.dtype.itemsize

    def advance(self, num_new_B):
        """Count ``num_new_B`` more tokens per sequence (int or int [B])."""
        return self.replace(lengths_B=self.lengths_B + jnp.asarray(num_new_B, jnp.int32))

    def with_lengths(self, lengths_B):
        """The same state with ``lengths_B`` tokens counted per sequence."""
        lengths_B = jnp.broadcast_to(jnp.asarray(lengths_B, jnp.int32), self.lengths_B.shape)
        return self.replace(lengths_B=lengths_B)

    def update_and_attend(
        self,
        q_BTNH,
        k_BTKH,
        v_BTKV,
        *,
        num_new_B=None,
        variant: str = "linear_attn",
        log_decay=None,
        beta=None,
        mask=None,
        **op_kwargs,
    ):
        """Attend T new (feature-mapped) queries over the state and the new tokens; fold the
        first ``num_new_B[b]`` new tokens into the state and count them.

        Args:
          q_BTNH, k_BTKH, v_BTKV: the new tokens' queries, keys and values.
          num_new_B: valid new tokens per sequence (default T); trailing padding leaves the
            state unchanged (its keys, gates and β are zeroed).
          variant, log_decay, beta: as ``jaxattn.ops.linear_attention`` (per new step).
          mask: ignored (linear attention is causal by construction); accepted for the
            protocol.
          op_kwargs: further ``linear_attention`` arguments (scale, normalize, chunk_size).

        Returns:
          (o_BTNV in q's dtype, the cache with the state advanced).
        """
        del mask
        b, t, _, _ = k_BTKH.shape
        if self.state_BKHV.shape[:3] != (b, *k_BTKH.shape[2:]):
            raise ValueError(
                f"new keys {k_BTKH.shape} do not match the state {self.state_BKHV.shape}"
            )
        if variant == "retention":  # per-step decays, so padding steps can be neutral
            log_decay = jnp.broadcast_to(
                retention_log_decay(k_BTKH.shape[2]) if log_decay is None else log_decay,
                (b, t, k_BTKH.shape[2]),
            )
            variant = "simple_gla"
        if num_new_B is not None:
            n_B = jnp.broadcast_to(jnp.asarray(num_new_B, jnp.int32), (b,))
            live_BT = jnp.arange(t, dtype=jnp.int32)[None, :] < n_B[:, None]
            k_BTKH = jnp.where(live_BT[:, :, None, None], k_BTKH, 0)
            if log_decay is not None:
                live = live_BT.reshape(b, t, *([1] * (log_decay.ndim - 2)))
                log_decay = jnp.where(live, log_decay, 0)
            if beta is not None:
                beta = jnp.where(live_BT[:, :, None], beta, 0)
        o, state = linear_attention(
            q_BTNH,
            k_BTKH,
            v_BTKV,
            variant=variant,
            log_decay=log_decay,
            beta=beta,
            initial_state=self.state_BKHV.astype(jnp.float32),
            return_state=True,
            implementation="recurrent" if t == 1 else "chunked",
            **op_kwargs,
        )
        cache = self.replace(state_BKHV=state.astype(self.state_BKHV.dtype))
        return o, cache.advance(t if num_new_B is None else num_new_B)
