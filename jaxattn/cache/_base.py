"""What every cache shares: slots and key positions under a policy, ragged writes, capacity
checks, and the attention over the stored rows (DESIGN.md, Extension point 6).

A cache is a pytree of fixed-shape buffers [B, C, ...] (so it can live in a
``jax.lax.while_loop`` carry) plus ``lengths_B``, the number of tokens each sequence has
seen: the next token of sequence b sits at absolute position ``lengths_B[b]``. Where that
token is stored depends on the policy (static fields ``sink`` and ``window``):

* full (``window == 0``): token p at slot p; at most C positions per sequence.
* sink + window ring (``window > 0``, C = sink + window slots): token p at slot p when
  p < sink, else at ``sink + (p - sink) % window``, overwriting the token ``window``
  positions before it. ``key_positions_BC`` says which absolute position each slot holds.

``_SlotsMixin.attend_and_write`` is the one attention over a cache: for a full cache and for a
one-token ring step the new rows are written first and the op runs over the buffers as they
are (mask spec + ``kv_lengths``: the Pallas decode kernels can serve it); a multi-token ring
write (prefill) would overwrite keys its own earlier queries still see, so it attends over the
old slots and the new rows together under a mask built from their explicit key positions, then
writes. The op runs in the storage dtype with fp32 accumulation: the (few) queries are cast to
it, never the cache.

Overflow of a full cache: a static write longer than C, or concrete lengths that would pass C,
raise ValueError before the write. Traced lengths cannot be checked on the host: the write
carries a ``jax.experimental.checkify.debug_check`` (reported when the caller wraps the program
in ``checkify.checkify``; a no-op otherwise), and without checkify the behaviour is defined:
rows past capacity are dropped (never clamped onto other slots) and the overflowing sequence's
outputs are NaN from that step on, like out-of-range token ids (``poison_after_invalid``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxattn.ops.attention import dot_product_attention

__all__ = ["write_rows", "check_capacity"]


def _num_new(num_new_B, t: int, b: int) -> jax.Array:
    if num_new_B is None:
        return jnp.full((b,), t, jnp.int32)
    return jnp.broadcast_to(jnp.asarray(num_new_B, jnp.int32), (b,))


def _concrete(x):
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def write_rows(
    buf_BC_: jax.Array,
    new_BT_: jax.Array,
    lengths_B: jax.Array,
    num_new_B=None,
    *,
    sink: int = 0,
    window: int = 0,
) -> jax.Array:
    """Store new token rows at their slots under the policy; rows with nowhere to go are dropped.

    Args:
      buf_BC_: cache buffer [B, C, ...].
      new_BT_: rows of T new tokens [B, T, ...] at positions ``lengths_B[b] + t`` (cast to the
        buffer's dtype).
      lengths_B: int [B] tokens seen so far per sequence.
      num_new_B: int or int [B]: only the first ``num_new_B[b]`` rows are stored (default T).
      sink, window: the policy (window 0: full).

    Returns:
      The updated buffer [B, C, ...]. Full: slots past C are dropped (see ``check_capacity``).
      Ring: a row is stored when it is a sink or among the last ``window`` new positions.
    """
    b, t = new_BT_.shape[:2]
    c = buf_BC_.shape[1]
    pos_BT = positions_BT(lengths_B, t)
    n_B1 = _num_new(num_new_B, t, b)[:, None]
    kept_BT = jnp.arange(t, dtype=jnp.int32)[None, :] < n_B1
    if window:
        # the last occupant of each ring slot wins: a row is superseded by the one window later
        end_B1 = lengths_B[:, None].astype(jnp.int32) + n_B1
        kept_BT &= (pos_BT < sink) | (pos_BT + window >= end_B1)
        slot_BT = jnp.where(pos_BT < sink, pos_BT, sink + (pos_BT - sink) % window)
    else:
        kept_BT &= pos_BT < c
        slot_BT = pos_BT
    slot_BT = jnp.where(kept_BT, slot_BT, c)  # out of range: dropped by the scatter
    rows_B1 = jnp.arange(b, dtype=jnp.int32)[:, None]
    return buf_BC_.at[rows_B1, slot_BT].set(new_BT_.astype(buf_BC_.dtype), mode="drop")


def positions_BT(lengths_B: jax.Array, t: int) -> jax.Array:
    """Absolute positions [B, T] of T new tokens: ``lengths_B[b] + t``."""
    return lengths_B[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]


def key_positions(lengths_B: jax.Array, capacity: int, *, sink: int = 0, window: int = 0):
    """The absolute position each slot holds, int32 [B, C]; -1 for an empty slot."""
    s_1C = jnp.arange(capacity, dtype=jnp.int32)[None, :]
    n_B1 = lengths_B[:, None].astype(jnp.int32)
    if not window:
        return jnp.where(s_1C < n_B1, s_1C, -1)
    j_1C = s_1C - sink
    last_B1C = n_B1 - 1 - sink - j_1C  # (the newest position stored at slot s) - (the first)
    ring_BC = jnp.where(last_B1C >= 0, sink + j_1C + window * (last_B1C // window), -1)
    return jnp.where(s_1C < sink, jnp.where(s_1C < n_B1, s_1C, -1), ring_BC)


def check_capacity(capacity: int, needed: int) -> None:
    """Raise ValueError when ``needed`` static positions do not fit in ``capacity``."""
    if needed > capacity:
        raise ValueError(
            f"cache capacity {capacity} is too small for {needed} positions "
            "(init_cache with a larger capacity, or use CacheConfig(policy='sink_window'))"
        )


def check_room(lengths_B: jax.Array, t: int, num_new_B, capacity: int) -> jax.Array:
    """Check that T new tokens fit a full cache; returns bool [B]: the rows that overflow.

    Raises:
      ValueError: T > capacity (static), or concrete lengths that would pass capacity.
    """
    if t > capacity:
        raise ValueError(
            f"writing {t} new tokens per sequence needs {t} slots, more than the cache "
            f"capacity={capacity} (init_cache with a larger capacity, or use "
            "CacheConfig(policy='sink_window'))"
        )
    n_B = _num_new(num_new_B, t, lengths_B.shape[0])
    end_B = lengths_B.astype(jnp.int32) + n_B
    lengths, end = _concrete(lengths_B), _concrete(end_B)
    if end is not None:
        if end.max(initial=0) > capacity:
            raise ValueError(
                f"cache overflow: lengths_B={lengths.tolist()} plus {_concrete(n_B).tolist()} "
                f"new tokens exceed capacity={capacity}"
            )
    else:
        checkify.debug_check(
            jnp.all(end_B <= capacity),
            f"cache overflow: lengths_B={{lengths}} plus new tokens exceed capacity={capacity}",
            lengths=lengths_B,
        )
    return end_B > capacity


class _SlotsMixin:
    """Policy-aware slots, key positions and the attention over them, for caches with
    ``lengths_B``, static ``sink`` / ``window`` and a ``capacity`` property."""

    @property
    def max_positions(self) -> int | None:
        """The most tokens a sequence can see: C for a full cache, None (unbounded) for a ring."""
        return None if self.window else self.capacity

    def key_positions_BC(self) -> jax.Array:
        """The absolute position each slot holds, int32 [B, C] (-1: empty)."""
        return key_positions(self.lengths_B, self.capacity, sink=self.sink, window=self.window)

    def positions_BT(self, t: int) -> jax.Array:
        """Positions [B, T] of the next T tokens."""
        return positions_BT(self.lengths_B, t)

    def check_room(self, needed: int) -> None:
        """Raise ValueError when a sequence of ``needed`` tokens cannot be decoded (full caches
        hold C; rings any number)."""
        if not self.window:
            check_capacity(self.capacity, needed)

    def advance(self, num_new_B: jax.Array | int):
        """Count ``num_new_B`` more tokens per sequence (int or int [B])."""
        return self.replace(lengths_B=self.lengths_B + jnp.asarray(num_new_B, jnp.int32))

    def with_lengths(self, lengths_B: jax.Array):
        """The same buffers with ``lengths_B`` tokens seen per sequence."""
        return self.replace(
            lengths_B=jnp.broadcast_to(jnp.asarray(lengths_B, jnp.int32), self.lengths_B.shape)
        )

    def _attend_and_write(self, q_BTNH, bufs, new, num_new_B, *, mask, **op_kwargs):
        """Attend T new queries over the stored rows and the new ones; store the new rows.

        Args:
          q_BTNH: queries at positions ``lengths_B[b] + t`` [B, T, N, H].
          bufs: (k_BC_, v_BC_ or None: the values are the keys), as stored.
          new: (k_BT_, v_BT_ or None), the new tokens' rows.
          num_new_B: valid new tokens per sequence (default T).
          mask: the layer's mask spec over absolute positions (Causal or a causal window; a
            ring takes Causal only).
          op_kwargs: the other ``dot_product_attention`` arguments (scale, implementation...).

        Returns:
          (o_BTN_ in q's dtype, new bufs). Does not advance ``lengths_B``.
        """
        b, t = q_BTNH.shape[:2]
        k_buf, v_buf = bufs
        k_new, v_new = new
        dt = k_buf.dtype
        start_B = self.lengths_B
        write = dict(sink=self.sink, window=self.window)

        def store():
            k = write_rows(k_buf, k_new, start_B, num_new_B, **write)
            v = None if v_buf is None else write_rows(v_buf, v_new, start_B, num_new_B, **write)
            return k, v

        q = q_BTNH.astype(dt)  # the queries take the storage dtype; the cache is never cast
        if not self.window:
            overflow_B = check_room(start_B, t, num_new_B, self.capacity)
            k, v = store()
            o = dot_product_attention(
                q,
                k,
                k if v is None else v,
                mask=mask,
                q_offset=start_B,
                kv_lengths=jnp.minimum(start_B + t, self.capacity),
                **op_kwargs,
            )
            # defined overflow: NaN outputs for a sequence past capacity (traced lengths)
            o = jnp.where(overflow_B[:, None, None, None], jnp.nan, o)
            return o.astype(q_BTNH.dtype), (k, v)
        if t == 1:  # after the write every filled slot is visible: a sink or in the window
            k, v = store()
            o = dot_product_attention(
                q,
                k,
                k if v is None else v,
                kv_lengths=jnp.minimum(start_B + 1, self.capacity),
                **op_kwargs,
            )
            return o.astype(q_BTNH.dtype), (k, v)
        # several new tokens: attend over [old slots | new rows] by explicit positions, then write
        kpos_BS = jnp.concatenate([self.key_positions_BC(), self.positions_BT(t)], axis=1)
        qpos_BT1 = self.positions_BT(t)[:, :, None]
        kpos_B1S = kpos_BS[:, None, :]
        vis_BTS = (kpos_B1S >= 0) & (kpos_B1S <= qpos_BT1)
        vis_BTS &= (kpos_B1S < self.sink) | (qpos_BT1 - kpos_B1S < self.window)
        keys = jnp.concatenate([k_buf, k_new.astype(dt)], axis=1)
        if v_buf is None:
            values = keys
        else:
            values = jnp.concatenate([v_buf, v_new.astype(dt)], axis=1)
        o = dot_product_attention(q, keys, values, mask=vis_BTS, **op_kwargs)
        return o.astype(q_BTNH.dtype), store()
