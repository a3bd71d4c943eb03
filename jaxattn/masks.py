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

Run-time visit lists, computed from data inside ``jit``, are not specs: ``BlockVisits`` (per
batch row, kv head and query block, a padded list of kv-block indices and a count) is passed
to ``dot_product_attention(block_visits=...)`` and ANDs with the spec. A ``BlockSparse`` whose
layout is a jax array (traced or not) or differs per batch row and head is lowered to such
lists by the op.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_tables import BlockVisits

__all__ = [
    "MaskSpec",
    "Full",
    "Causal",
    "SlidingWindow",
    "SinkWindow",
    "ChunkedCausal",
    "BlockSparse",
    "BlockVisits",
    "And",
    "Or",
    "materialize",
    "split_dynamic",
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
      layout: bool, either static — a numpy array (or nested lists) [num_q_blocks,
        num_kv_blocks], served by every implementation and the Pallas kernels — or dynamic: a
        jax array (concrete or traced inside ``jit``) [nq, nk], or any array
        [B or 1, K or 1, nq, nk] that differs per batch row and kv head. Positions past its
        extent are masked.
      block_q: query positions per layout row.
      block_kv: key positions per layout column.

    A dynamic layout is lowered by ``dot_product_attention`` to ``BlockVisits`` (layout row
    ``(i + q_offset) // block_q`` for query row i), so it may only be ANDed with other specs
    (not inside ``|``), and q_offset must then be a Python int that is a multiple of
    ``block_q``. Static layouts hash by value; dynamic ones by identity.
    """

    layout: Any
    block_q: int
    block_kv: int

    def __post_init__(self):
        _check_int("BlockSparse.block_q", self.block_q, 1)
        _check_int("BlockSparse.block_kv", self.block_kv, 1)
        layout = self.layout
        if not isinstance(layout, jax.Array):
            layout = np.asarray(layout)
        if layout.ndim not in (2, 4) or layout.dtype != np.bool_:
            raise ValueError(
                "BlockSparse.layout must be a bool array [q_blocks, kv_blocks] or "
                f"[B or 1, K or 1, q_blocks, kv_blocks], got shape {layout.shape} dtype "
                f"{layout.dtype}"
            )
        if isinstance(layout, np.ndarray):
            layout = layout.copy()
            layout.setflags(write=False)
        object.__setattr__(self, "layout", layout)

    @property
    def is_dynamic(self) -> bool:
        """True for a jax-array or per-(batch, head) layout: lowered to block-visit lists."""
        return isinstance(self.layout, jax.Array) or self.layout.ndim == 4

    def __eq__(self, other):
        if self.is_dynamic or not isinstance(other, BlockSparse) or other.is_dynamic:
            return self is other
        return (
            (self.block_q, self.block_kv) == (other.block_q, other.block_kv)
            and self.layout.shape == other.layout.shape
            and bool((self.layout == other.layout).all())
        )

    def __hash__(self):
        if self.is_dynamic:
            return id(self)
        return hash((self.block_q, self.block_kv, self.layout.shape, self.layout.tobytes()))

    @property
    def has_array_data(self) -> bool:
        return True

    def _layout_2d(self):
        if self.layout.ndim != 2:
            raise ValueError(
                "a per-(batch, head) BlockSparse layout has no elementwise view; "
                "dot_product_attention lowers it to block-visit lists"
            )
        return self.layout

    def __call__(self, q_pos, k_pos):
        table = self._layout_2d()
        (nq, nk), qb, kb = table.shape, q_pos // self.block_q, k_pos // self.block_kv
        inside = (qb >= 0) & (qb < nq) & (kb >= 0) & (kb < nk)
        return inside & jnp.asarray(table)[jnp.clip(qb, 0, nq - 1), jnp.clip(kb, 0, nk - 1)]

    def _range_reduce(self, q_lo, q_hi, k_lo, k_hi, reduce_any: bool):
        # Prefix sums over the layout answer "any/all set in a rectangle" in O(1).
        layout = self._layout_2d()
        nq, nk = layout.shape
        if isinstance(layout, np.ndarray):  # a constant of the program
            cum = np.zeros((nq + 1, nk + 1), np.int32)
            cum[1:, 1:] = layout.astype(np.int32).cumsum(0).cumsum(1)
        else:
            cum = jnp.pad(layout.astype(jnp.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
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

    def to_visits(self, *, q_len: int, kv_len: int, q_offset=None, name="BlockSparse"):
        """The layout as ``BlockVisits`` for T = ``q_len`` query rows starting at position
        ``q_offset`` (a Python int multiple of block_q) and S = ``kv_len`` keys.

        Raises:
          ValueError: q_offset is traced, or not a multiple of block_q.
        """
        off = 0 if q_offset is None else q_offset
        if not isinstance(off, int) or off % self.block_q:
            raise ValueError(
                f"{name}: a dynamic BlockSparse layout needs q_offset to be a Python int "
                f"multiple of block_q={self.block_q}, got {q_offset!r}; pass BlockVisits "
                "(whose query blocks are query rows) instead"
            )
        layout = jnp.asarray(self.layout)
        layout = layout if layout.ndim == 4 else layout[None, None]
        nq_l, nk_l = layout.shape[-2:]
        rows = off // self.block_q + np.arange(-(-q_len // self.block_q))
        nk = min(nk_l, -(-kv_len // self.block_kv))  # columns past S hold no key
        picked = layout[:, :, np.clip(rows, 0, nq_l - 1), :nk]
        picked = picked & jnp.asarray(rows < nq_l)[:, None]  # rows past the layout: masked
        order = jnp.argsort(~picked, axis=-1, stable=True).astype(jnp.int32)
        counts = jnp.sum(picked, axis=-1, dtype=jnp.int32)
        return BlockVisits(
            indices=order, counts=counts, block_q=self.block_q, block_kv=self.block_kv
        )


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


def split_dynamic(spec: MaskSpec):
    """(the spec without its dynamic BlockSparse leaves, or None; those leaves).

    Dynamic leaves may sit at the top or inside ``&`` chains only: they become block-visit
    lists, which AND with the rest.

    Raises:
      ValueError: a dynamic BlockSparse inside ``|``.
    """
    if isinstance(spec, BlockSparse) and spec.is_dynamic:
        return None, [spec]
    if isinstance(spec, And):
        (a, da), (b, db) = split_dynamic(spec.a), split_dynamic(spec.b)
        rest = a if b is None else b if a is None else And(a, b)
        return rest, da + db
    if _has_dynamic(spec):
        raise ValueError(
            "a dynamic BlockSparse layout (a jax array, or per batch row and head) can only be "
            "combined with & (it becomes block-visit lists); it sits inside | here"
        )
    return spec, []


def _has_dynamic(spec) -> bool:
    if isinstance(spec, (And, Or)):
        return _has_dynamic(spec.a) or _has_dynamic(spec.b)
    return isinstance(spec, BlockSparse) and spec.is_dynamic


def materialize(spec: MaskSpec, q_len: int, kv_len: int, q_offset: int = 0):
    """The dense bool mask [q_len, kv_len] of ``spec`` for queries starting at ``q_offset``."""
    _check_spec(spec, "spec")
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + q_offset
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(spec(q_pos, k_pos), (q_len, kv_len))
