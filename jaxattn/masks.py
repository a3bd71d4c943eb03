"""Declarative attention masks.

A mask spec says which keys a query may attend to, as a function of positions on the kv axis:
the query in row ``i`` sits at position ``p = i + q_offset`` and key ``j`` at position ``j``.
Because specs are declarative, implementations can skip whole blocks of the score matrix
that a spec rules out (the causal upper triangle costs nothing) without looking at elements.

Every spec offers three views of the same predicate:

* ``spec(q_pos, k_pos) -> bool`` elementwise, on broadcastable int32 arrays;
* ``spec.block_visible(q_lo, q_hi, k_lo, k_hi)``: may the block of queries at positions
  ``[q_lo, q_hi]`` and keys ``[k_lo, k_hi]`` (inclusive) hold any visible pair? Never False
  when some pair is visible (blocks it rules out are skipped);
* ``spec.block_full(q_lo, q_hi, k_lo, k_hi)``: is every pair in that block visible? Never True
  when some pair is masked (full blocks need no elementwise mask).

Both block views take jnp scalars or broadcastable arrays, so they work on traced offsets.
Specs are frozen, hashable dataclasses (usable as static jit arguments) and combine with
``&`` and ``|``.

Semantics (DESIGN.md): ``Causal()``: j <= p. ``SlidingWindow(left, right)``:
p - left <= j <= p + right (a Mistral window W is left = W - 1). ``SinkWindow(sinks, window)``:
j <= p and (j < sinks or p - j < window). ``ChunkedCausal(chunk)``: j <= p and
j // chunk == p // chunk. ``BlockSparse(layout, block_q, block_kv)``: visible where
``layout[p // block_q, j // block_kv]``; positions outside the layout are masked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "MaskSpec",
    "Full",
    "Causal",
    "SlidingWindow",
    "SinkWindow",
    "ChunkedCausal",
    "BlockSparse",
    "And",
    "Or",
    "materialize",
]


class MaskSpec:
    """Base class of mask specs: elementwise predicate plus conservative block views."""

    def __call__(self, q_pos, k_pos):
        raise NotImplementedError

    def block_visible(self, q_lo, q_hi, k_lo, k_hi):
        raise NotImplementedError

    def block_full(self, q_lo, q_hi, k_lo, k_hi):
        raise NotImplementedError

    @property
    def has_array_data(self) -> bool:
        """True when the predicate reads array data (cannot be traced inside a kernel)."""
        return False

    def __and__(self, other: MaskSpec) -> MaskSpec:
        _check_spec(other, "right operand of &")
        return And(self, other)

    def __or__(self, other: MaskSpec) -> MaskSpec:
        _check_spec(other, "right operand of |")
        return Or(self, other)


def _check_spec(obj: Any, what: str) -> None:
    if not isinstance(obj, MaskSpec):
        raise ValueError(f"{what} must be a jaxattn.masks spec, got {type(obj).__name__}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class Full(MaskSpec):
    """Every query sees every key."""

    def __call__(self, q_pos, k_pos):
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)

    def block_visible(self, q_lo, q_hi, k_lo, k_hi):
        return jnp.ones(jnp.broadcast_shapes(*map(jnp.shape, (q_lo, q_hi, k_lo, k_hi))), bool)

    block_full = block_visible


@dataclasses.dataclass(frozen=True)
class Causal(MaskSpec):
    """Key j is visible from query position p when j <= p."""

    def __call__(self, q_pos, k_pos):
        return k_pos <= q_pos

    def block_visible(self, q_lo, q_hi, k_lo, k_hi):
        return k_lo <= q_hi

    def block_full(self, q_lo, q_hi, k_lo, k_hi):
        return k_hi <= q_lo


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlidingWindow(MaskSpec):
    """p - left <= j <= p + right; ``left=W-1, right=0`` is a causal window of W keys."""

    left: int
    right: int = 0

    def __post_init__(self):
        _check_int("SlidingWindow.left", self.left, 0)
        _check_int("SlidingWindow.right", self.right, 0)

    def __call__(self, q_pos, k_pos):
        return (k_pos >= q_pos - self.left) & (k_pos <= q_pos + self.right)

    def block_visible(self, q_lo, q_hi, k_lo, k_hi):
        return (k_hi >= q_lo - self.left) & (k_lo <= q_hi + self.right)

    def block_full(self, q_lo, q_hi, k_lo, k_hi):
        return (k_lo >= q_hi - self.left) & (k_hi <= q_lo + self.right)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SinkWindow(MaskSpec):
    """StreamingLLM / LM-Infinite: causal, and either one of the first ``sinks`` keys or
    within the last ``window`` positions (p - j < window)."""

    sinks: int
    window: int

    def __post_init__(self):
        _check_int("SinkWindow.sinks", self.sinks, 0)
        _check_int("SinkWindow.window", self.window, 1)

    def __call__(self, q_pos, k_pos):
        return (k_pos <= q_pos) & ((k_pos < self.sinks) | (q_pos - k_pos < self.window))

    def block_visible(self, q_lo, q_hi, k_lo, k_hi):
        return (k_lo <= q_hi) & ((k_lo < self.sinks) | (q_lo - k_hi < self.window))

    def block_full(self, q_lo, q_hi, k_lo, k_hi):
        return (k_hi <= q_lo) & ((k_hi < self.sinks) | (q_hi - k_lo < self.window))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChunkedCausal(MaskSpec):
    """Causal within chunks of ``chunk`` positions (Llama 4 style local attention)."""

    chunk: int

    def __post_init__(self):
        _check_int("ChunkedCausal.chunk", self.chunk, 1)

    def __call__(self, q_pos, k_pos):
        return (k_pos <= q_pos) & (k_pos // self.chunk == q_pos // self.chunk)

    def block_visible(self, q_lo, q_hi, k_lo, k_hi):
        c = self.chunk
        return (k_lo <= q_hi) & (k_hi // c >= q_lo // c) & (k_lo // c <= q_hi // c)

    def block_full(self, q_lo, q_hi, k_lo, k_hi):
        c = self.chunk
        same = (k_lo // c == k_hi // c) & (q_lo // c == q_hi // c) & (k_lo // c == q_lo // c)
        return (k_hi <= q_lo) & same


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class BlockSparse(MaskSpec):
    """Visible where ``layout[p // block_q, j // block_kv]``.

    Args:
      layout: bool array [num_q_blocks, num_kv_blocks]; positions past its extent are masked.
      block_q: query positions per layout row.
      block_kv: key positions per layout column.
    """

    layout: Any
    block_q: int
    block_kv: int

    def __post_init__(self):
        layout = np.asarray(self.layout)
        if layout.ndim != 2 or layout.dtype != np.bool_:
            raise ValueError(
                f"BlockSparse.layout must be a 2-D bool array [q_blocks, kv_blocks], got "
                f"shape {layout.shape} dtype {layout.dtype}"
            )
        _check_int("BlockSparse.block_q", self.block_q, 1)
        _check_int("BlockSparse.block_kv", self.block_kv, 1)
        layout = layout.copy()
        layout.setflags(write=False)
        object.__setattr__(self, "layout", layout)

    def __eq__(self, other):
        return (
            isinstance(other, BlockSparse)
            and (self.block_q, self.block_kv) == (other.block_q, other.block_kv)
            and self.layout.shape == other.layout.shape
            and bool((self.layout == other.layout).all())
        )

    def __hash__(self):
        return hash((self.block_q, self.block_kv, self.layout.shape, self.layout.tobytes()))

    @property
    def has_array_data(self) -> bool:
        return True

    def _lookup(self, table, qb, kb):
        nq, nk = table.shape
        inside = (qb >= 0) & (qb < nq) & (kb >= 0) & (kb < nk)
        got = jnp.asarray(table)[jnp.clip(qb, 0, nq - 1), jnp.clip(kb, 0, nk - 1)]
        return inside & got

    def __call__(self, q_pos, k_pos):
        return self._lookup(self.layout, q_pos // self.block_q, k_pos // self.block_kv)

    def _range_reduce(self, q_lo, q_hi, k_lo, k_hi, reduce_any: bool):
        # Prefix sums over the layout answer "any/all set in a rectangle" in O(1).
        nq, nk = self.layout.shape
        cum = np.zeros((nq + 1, nk + 1), np.int32)
        cum[1:, 1:] = self.layout.astype(np.int32).cumsum(0).cumsum(1)
        cum = jnp.asarray(cum)
        qa = jnp.clip(q_lo // self.block_q, 0, nq)
        qb = jnp.clip(q_hi // self.block_q + 1, 0, nq)
        ka = jnp.clip(k_lo // self.block_kv, 0, nk)
        kb = jnp.clip(k_hi // self.block_kv + 1, 0, nk)
        count = cum[qb, kb] - cum[qa, kb] - cum[qb, ka] + cum[qa, ka]
        if reduce_any:
            return count > 0
        # Every layout cell touched must be set, and the block must lie inside the layout.
        inside = (q_lo >= 0) & (k_lo >= 0)
        inside &= (q_hi < nq * self.block_q) & (k_hi < nk * self.block_kv)
        return inside & (count == (qb - qa) * (kb - ka))

    def block_visible(self, q_lo, q_hi, k_lo, k_hi):
        return self._range_reduce(q_lo, q_hi, k_lo, k_hi, True)

    def block_full(self, q_lo, q_hi, k_lo, k_hi):
        return self._range_reduce(q_lo, q_hi, k_lo, k_hi, False)


@dataclasses.dataclass(frozen=True)
class And(MaskSpec):
    """Visible where both specs are visible."""

    a: MaskSpec
    b: MaskSpec

    def __call__(self, q_pos, k_pos):
        return self.a(q_pos, k_pos) & self.b(q_pos, k_pos)

    def block_visible(self, *block):
        return self.a.block_visible(*block) & self.b.block_visible(*block)

    def block_full(self, *block):
        return self.a.block_full(*block) & self.b.block_full(*block)

    @property
    def has_array_data(self) -> bool:
        return self.a.has_array_data or self.b.has_array_data


@dataclasses.dataclass(frozen=True)
class Or(MaskSpec):
    """Visible where either spec is visible."""

    a: MaskSpec
    b: MaskSpec

    def __call__(self, q_pos, k_pos):
        return self.a(q_pos, k_pos) | self.b(q_pos, k_pos)

    def block_visible(self, *block):
        return self.a.block_visible(*block) | self.b.block_visible(*block)

    def block_full(self, *block):
        return self.a.block_full(*block) | self.b.block_full(*block)

    @property
    def has_array_data(self) -> bool:
        return self.a.has_array_data or self.b.has_array_data


def materialize(spec: MaskSpec, q_len: int, kv_len: int, q_offset: int = 0):
    """The dense bool mask [q_len, kv_len] of ``spec`` for queries starting at ``q_offset``."""
    _check_spec(spec, "spec")
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + q_offset
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(spec(q_pos, k_pos), (q_len, kv_len))
