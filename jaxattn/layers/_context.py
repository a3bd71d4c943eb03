"""The call context: what every block and layer may read besides its input (Extension point 2).

One small frozen pytree travels from ``DecoderLM`` through every block and layer down to each
``Linear``: token positions, packing segments, a per-sequence id (which adapter or task a row
uses), an RNG key for stochastic layers, and the active hooks. Training and generation fill it;
layers read only what they need. ``layer`` (static) is the index of the block being run, so a
layer can name its hook points and derive its own random stream.

Randomness: ``rng`` is None in evaluation and generation, where stochastic layers are the
identity; training passes a fresh key every step. ``ctx.key(tag)`` derives a key for one use
from the layer index and a per-site tag, so the same (step key, layer, site) always draws the
same numbers and different sites never share them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["Context", "dropout"]


@struct.dataclass
class Context:
    """Per-call side inputs of a model, shared by all its layers.

    Attributes:
      positions_BT: int32 [B, T] position of each token (RoPE, masks).
      segment_ids_BT: int32 [B, T] packing segments (tokens attend within a segment) or None.
      sequence_ids_B: int32 [B] a per-sequence id (which adapter / task a row uses) or None.
      rng: a typed PRNG key for stochastic layers (dropout), or None (deterministic).
      hooks: the active hooks (static; empty: the forward is the plain program).
      layer: index of the block being run (static; None outside the blocks).
      decoding: True inside ``AttentionLayer.decode`` (static): a cache step, where a layer
        sows no training-only values (auxiliary losses).
      keys_pre_rope: True in a decode step over a cache that stores keys before RoPE
        (static; the cache's ``pre_rope``, e.g. KVQuant's): ``qk_transform`` leaves the new
        keys unrotated and the cache rotates them at their positions when it attends (a
        decode hook on ``k`` then captures the pre-RoPE keys).
    """

    positions_BT: jax.Array
    segment_ids_BT: jax.Array | None = None
    sequence_ids_B: jax.Array | None = None
    rng: jax.Array | None = None
    hooks: Any = struct.field(pytree_node=False, default=())
    layer: int | None = struct.field(pytree_node=False, default=None)
    decoding: bool = struct.field(pytree_node=False, default=False)
    keys_pre_rope: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls,
        batch: int,
        length: int,
        *,
        positions_BT=None,
        segment_ids_BT=None,
        sequence_ids_B=None,
        rng=None,
        hooks=(),
    ) -> Context:
        """A context for ``batch`` rows of ``length`` tokens, checking every field's shape.

        Args:
          batch, length: B and T of the tokens the context accompanies.
          positions_BT: int [B, T] (default 0..T-1 on every row).
          segment_ids_BT: int [B, T] or None.
          sequence_ids_B: int [B] or None.
          rng: a typed key (``jax.random.key``), raw uint32 key data [2], or None.
          hooks: the active hooks.

        Raises:
          ValueError: a field of the wrong shape or dtype (named).
        """
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions_BT = _int_array("positions_BT", positions_BT, (batch, length))
        if segment_ids_BT is not None:
            segment_ids_BT = _int_array("segment_ids_BT", segment_ids_BT, (batch, length))
        if sequence_ids_B is not None:
            sequence_ids_B = _int_array("sequence_ids_B", sequence_ids_B, (batch,))
        return cls(
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            sequence_ids_B=sequence_ids_B,
            rng=_typed_key(rng),
            hooks=hooks,
        )

    def at_layer(self, layer: int) -> Context:
        """This context inside block ``layer`` (its own random stream)."""
        return self.replace(layer=int(layer))

    def key(self, tag: int) -> jax.Array | None:
        """A key for one random use at site ``tag`` of the current layer (None if no rng)."""
        if self.rng is None:
            return None
        layer = -1 if self.layer is None else self.layer
        return jax.random.fold_in(jax.random.fold_in(self.rng, layer + 1), tag)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest by
    1 / (1 - rate); the identity when ``rate`` is 0 or ``key`` is None (evaluation).

    Args:
      x: any array.
      rate: drop probability in [0, 1).
      key: a typed PRNG key, or None.

    Returns:
      An array like ``x``.
    """
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _int_array(name: str, x, shape: tuple[int, ...]) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an int array, got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape}")
    return x.astype(jnp.int32)


def _typed_key(rng):
    if rng is None:
        return None
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"rng must be a single key, got key array of shape {rng.shape}")
        return rng
    if rng.dtype == jnp.uint32 and rng.shape == (2,):
        return jax.random.wrap_key_data(rng)
    raise ValueError(
        f"rng must be a jax.random.key(...) or uint32 key data [2], got {rng.dtype}{rng.shape}"
    )
