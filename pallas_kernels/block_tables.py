"""Block visit tables: which kv blocks each query block visits, built once for every consumer.

The one builder of the visit tables of jaxattn's "chunked" and "decode" paths and of the Pallas
flash kernels (which scalar-prefetch them). It turns

* a mask spec's conservative block views (``block_visible`` / ``block_full``) at the query
  positions ``row + q_offset``,
* kv lengths, segment-id ranges and a dense mask's block reduction (the pure-XLA paths),
* run-time visit lists (:class:`BlockVisits`: per batch row, kv head and query block, a
  padded list of kv-block indices and a count, computed inside ``jit`` from data),

into compressed tables: for each (batch row, kv head, query block) the visible kv blocks in
increasing order, their count, and flags per entry (``FULL_BIT``: no pair of the block is
masked by the spec, the lengths or the padding; bit ``1 + l``: the block value of the l-th
array-data leaf of the spec, for kernels that cannot read a layout elementwise). Entries past
the count repeat the last index, so a kernel grid that walks the list issues no DMA for them.
``transpose`` lists query blocks per kv block instead (the dk/dv kernels).

Visit lists AND with everything else. Their query blocks are query *rows* (row i is in list
row i // block_q, whatever q_offset is) and their kv blocks are keys j // block_kv; a consumer's
blocks must nest inside the lists' blocks (``nests``), so a consumer block is listed or not as
a whole. Tables are [Rb, Rk, rows, steps]: Rb is 1 (shared by the batch) or B, Rk is 1 or K.
jax only (no Pallas): importing this module loads no kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FULL_BIT", "BlockVisits", "Tables", "build", "nests", "array_leaves", "children"]

FULL_BIT = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _concrete(x):
    """``x`` as a numpy array, or None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["indices", "counts"],
    meta_fields=["block_q", "block_kv"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockVisits:
    """Run-time visit lists: which kv blocks each query block may attend to (a jax pytree).

    Query block r holds query rows ``r * block_q .. (r + 1) * block_q - 1`` (rows, not
    positions: q_offset does not move them); kv block c holds keys ``c * block_kv ..``. A key
    is visible to a query only if its block is listed for the query's block (ANDed with the
    mask spec, segment ids and kv_lengths). Duplicates are harmless, order is free, and a query
    block with no listed block gives zeros.

    Attributes:
      indices: int [B or 1, K or 1, Q, L]: kv-block indices per (batch row, kv head, query
        block); a size-1 leading axis is shared by every batch row / kv head. Q = ceil(T /
        block_q); entries at slots >= counts are ignored. The kv head of query head n is
        n // (N / K) (the key heads when key and value head counts differ).
      counts: int [B or 1, K or 1, Q]: the number of leading entries of each list in use,
        0 <= counts <= L.
      block_q, block_kv: query rows and keys per block (static Python ints).

    Concrete values are checked by ``check``; traced ones cannot be: there, counts are clipped
    to [0, L] and listed indices outside [0, ceil(S / block_kv)) are ignored.
    """

    indices: Any
    counts: Any
    block_q: int
    block_kv: int

    @property
    def length(self) -> int:
        """L, the (static) length of each list."""
        return int(np.shape(self.indices)[-1])

    def check(self, *, batch: int, kv_heads: int, q_len: int, kv_len: int, name="block_visits"):
        """Validate against a call's shapes; returns a copy with int32 arrays.

        Raises:
          ValueError: naming ``name`` and what was expected, for bad block sizes, shapes,
            dtypes, and (when concrete) counts or indices out of range.
        """
        for field in ("block_q", "block_kv"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
        idx, cnt = self.indices, self.counts
        for field, x in (("indices", idx), ("counts", cnt)):
            if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(
                    f"{name}.{field} must be an integer array, got {getattr(x, 'dtype', type(x))}"
                )
        nq, nk = _cdiv(q_len, self.block_q), _cdiv(kv_len, self.block_kv)
        want = f"[B or 1, K or 1, Q, L] with B={batch}, K={kv_heads}, Q=ceil(T/block_q)={nq}"
        if np.ndim(idx) != 4 or idx.shape[0] not in (1, batch) or idx.shape[1] not in (1, kv_heads):
            raise ValueError(f"{name}.indices must have shape {want}, got {np.shape(idx)}")
        if idx.shape[2] != nq:
            raise ValueError(
                f"{name}.indices must have Q = ceil(T / block_q) = ceil({q_len} / "
                f"{self.block_q}) = {nq} query blocks, got shape {np.shape(idx)}"
            )
        if np.shape(cnt) != idx.shape[:3]:
            raise ValueError(
                f"{name}.counts must have shape {idx.shape[:3]} (indices' first three axes), "
                f"got {np.shape(cnt)}"
            )
        L = idx.shape[3]
        cnt_np, idx_np = _concrete(cnt), _concrete(idx)
        if cnt_np is not None and cnt_np.size and (cnt_np.min() < 0 or cnt_np.max() > L):
            raise ValueError(
                f"{name}.counts must lie in [0, L={L}], got values in "
                f"[{cnt_np.min()}, {cnt_np.max()}]"
            )
        if cnt_np is not None and idx_np is not None:
            used = np.arange(L) < cnt_np[..., None]
            bad = used & ((idx_np < 0) | (idx_np >= nk))
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"{name}.indices must lie in [0, ceil(S / block_kv)) = [0, {nk}) for S="
                    f"{kv_len}, block_kv={self.block_kv}; got {idx_np[where]} at {where}"
                )
        return dataclasses.replace(
            self, indices=jnp.asarray(idx, jnp.int32), counts=jnp.asarray(cnt, jnp.int32)
        )

    def membership(self, num_kv: int):
        """bool [B or 1, K or 1, Q, num_kv]: is kv block c listed for query block r."""
        idx, cnt = jnp.asarray(self.indices, jnp.int32), jnp.asarray(self.counts, jnp.int32)
        Bv, Kv, Q, L = idx.shape
        used = jnp.arange(L, dtype=jnp.int32) < cnt[..., None]
        # unused slots and (traced) out-of-range indices land in an extra column, dropped
        idx = jnp.where(used & (idx >= 0) & (idx < num_kv), idx, num_kv)
        grid = jnp.ix_(jnp.arange(Bv), jnp.arange(Kv), jnp.arange(Q), jnp.arange(1))
        member = jnp.zeros((Bv, Kv, Q, num_kv + 1), bool)
        return member.at[grid[0], grid[1], grid[2], idx].set(True)[..., :num_kv]


def nests(length: int, block: int, outer: int) -> bool:
    """True when every block of ``block`` items (the last one clipped to ``length``) lies
    inside one block of ``outer`` items: a consumer block is then listed or not as a whole."""
    starts = np.arange(0, length, block)
    ends = np.minimum(starts + block, length) - 1
    return bool(np.all(starts // outer == ends // outer))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["index", "count", "flags"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class Tables:
    """Compressed visit lists (a jax pytree of int32 arrays).

    Attributes:
      index: [Rb, Rk, rows, steps]: blocks to visit per (batch row, kv head, row) in
        increasing order; slots past the count repeat the last listed block.
      count: [Rb, Rk, rows]: how many entries are real.
      flags: [Rb, Rk, rows, steps]: FULL_BIT and array-leaf bits of each entry's block.
    Rb is 1 (shared by every batch row) or B; Rk is 1 (shared by every kv head) or K.
    """

    index: Any
    count: Any
    flags: Any

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Static (Rb, Rk, rows, steps)."""
        return tuple(int(d) for d in self.index.shape)


def array_leaves(mask) -> list:
    """The array-data leaves of a (possibly combined) mask spec, in a fixed order."""
    if mask is None or not mask.has_array_data:
        return []
    kids = children(mask)
    if kids is None:
        return [mask]
    return [leaf for kid in kids for leaf in array_leaves(kid)]


def children(mask):
    """Spec-valued dataclass fields of a combinator (And/Or), or None for a leaf."""
    if not dataclasses.is_dataclass(mask):
        return None
    kids = [getattr(mask, f.name) for f in dataclasses.fields(mask)]
    kids = [k for k in kids if hasattr(k, "block_visible")]
    return kids or None


def block_ranges(length: int, block: int, num_blocks: int):
    """Inclusive index ranges [lo, hi] of each block, clipped to the real length."""
    starts = np.arange(num_blocks, dtype=np.int32) * block
    return starts, np.minimum(starts + block, length) - 1


def leaves_aligned(mask, *, q_len, kv_len, block_q, block_kv, q_offset) -> bool:
    """True when every array-data leaf is constant over each (real part of a) kernel block."""
    q_lo, q_hi = block_ranges(q_len, block_q, _cdiv(q_len, block_q))
    k_lo, k_hi = block_ranges(kv_len, block_kv, _cdiv(kv_len, block_kv))
    block = (q_lo[:, None] + q_offset, q_hi[:, None] + q_offset, k_lo[None, :], k_hi[None, :])
    with jax.ensure_compile_time_eval():
        for leaf in array_leaves(mask):
            if not np.array_equal(
                np.asarray(leaf.block_visible(*block)), np.asarray(leaf.block_full(*block))
            ):
                return False
    return True


def _spec_maps(mask, q_lo, q_hi, k_lo, k_hi, shape, leaf_bits: bool):
    """Mask-only visibility, fullness and leaf bits: numpy when the ranges are numpy."""
    static = isinstance(q_lo, np.ndarray)
    xp = np if static else jnp
    bits = np.zeros(shape[-2:], np.int32)
    with jax.ensure_compile_time_eval():
        if mask is None:
            return xp.ones(shape, bool), xp.ones(shape, bool), bits
        vis = xp.broadcast_to(xp.asarray(mask.block_visible(q_lo, q_hi, k_lo, k_hi)), shape)
        full = xp.broadcast_to(xp.asarray(mask.block_full(q_lo, q_hi, k_lo, k_hi)), shape)
        if leaf_bits:
            for l, leaf in enumerate(array_leaves(mask)):
                leaf_vis = np.asarray(leaf.block_visible(q_lo, q_hi, k_lo, k_hi))
                bits = bits | (np.broadcast_to(leaf_vis, shape[-2:]).astype(np.int32) << (1 + l))
    return vis, full, bits


def _ranges_overlap(q_seg, kv_seg, num_q, block_q, num_kv, block_kv):
    """[B, nq, nk]: may a q block and a kv block share a segment id (from min/max ranges)."""

    def ranges(seg, n_blocks, block):
        seg = jnp.pad(seg, ((0, 0), (0, n_blocks * block - seg.shape[1])), mode="edge")
        seg = seg.reshape(seg.shape[0], n_blocks, block)
        return seg.min(-1), seg.max(-1)

    qmin, qmax = ranges(q_seg, num_q, block_q)
    kmin, kmax = ranges(kv_seg, num_kv, block_kv)
    return (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])


def build(
    mask,
    *,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    q_offset=0,
    kv_lengths=None,
    segment_ids=None,
    dense=None,
    visits=(),
    per_batch: bool = False,
    transpose: bool = False,
    leaf_bits: bool = False,
) -> Tables:
    """Visit tables over kv blocks per query block (``transpose``: query blocks per kv block).

    Args:
      mask: None or a mask spec; query row i sits at position i + q_offset.
      q_len, kv_len: real lengths T and S; blocks past them are padding (masked).
      block_q, block_kv: the consumer's block sizes (T and S are padded to multiples).
      q_offset: a Python int (tables evaluated at trace time and the list length cut to the
        longest row), an int32 scalar, or int32 [B] (per batch row when ``per_batch``, else
        the batch's range: conservative).
      kv_lengths: None or int [B]; keys j >= kv_lengths[b] are masked (clipped to [0, S]).
      segment_ids: None or (q [B, T], kv [B, S]): blocks whose segment-id ranges do not
        overlap are skipped.
      dense: None or a bool mask [B or 1, N or 1, T, S]: blocks it masks entirely are skipped.
      visits: ``BlockVisits`` lists (checked), ANDed; the consumer's blocks must nest in theirs.
      per_batch: keep one table per batch row for kv_lengths, q_offset, segments and dense
        (else they are reduced over the batch: a superset, masked elementwise later).
      transpose: list query blocks per kv block.
      leaf_bits: set the array-leaf bits of the flags (kernels; needs a static q_offset).

    Returns:
      ``Tables`` [Rb, Rk, rows, steps].
    """
    nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
    q_lo, q_hi = block_ranges(q_len, block_q, nq)
    k_lo, k_hi = block_ranges(kv_len, block_kv, nk)
    exact = True
    if isinstance(q_offset, (int, np.integer)):
        off_lo = off_hi = int(q_offset)
    else:
        off = jnp.asarray(q_offset, jnp.int32)
        if off.ndim == 1 and per_batch:
            off_lo = off_hi = off[:, None, None]
        elif off.ndim == 1:
            off_lo, off_hi, exact = off.min(), off.max(), False
        else:
            off_lo = off_hi = off
    qlo, qhi = q_lo[:, None] + off_lo, q_hi[:, None] + off_hi
    vis_shape = (*np.shape(qlo)[:-2], nq, nk)
    vis, full, bits = _spec_maps(mask, qlo, qhi, k_lo[None], k_hi[None], vis_shape, leaf_bits)
    if isinstance(vis, np.ndarray):  # the mask alone bounds every list (statically)
        steps = int(np.max(np.sum(vis, axis=-2 if transpose else -1), initial=1))
    else:
        steps = nq if transpose else nk
    vis = jnp.asarray(vis).reshape(-1, 1, nq, nk)
    full = jnp.asarray(full).reshape(-1, 1, nq, nk) & exact
    k_start = jnp.asarray(k_lo)[None, None, None, :]
    k_end = k_start + block_kv  # a block holding padding keys is never full
    lens = jnp.int32(kv_len)
    if kv_lengths is not None:
        lens = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, kv_len)[:, None, None, None]
    vis &= k_start < (lens if per_batch else jnp.max(lens))
    full &= k_end <= (lens if per_batch else jnp.min(lens))
    if dense is not None:
        b, n = dense.shape[:2]
        d = jnp.pad(dense, ((0, 0), (0, 0), (0, nq * block_q - q_len), (0, nk * block_kv - kv_len)))
        d = d.reshape(b, n, nq, block_q, nk, block_kv).any(axis=(1, 3, 5))[:, None]
        vis &= d if per_batch else d.any(axis=0, keepdims=True)
        full &= False
    if segment_ids is not None:
        overlap = _ranges_overlap(*segment_ids, nq, block_q, nk, block_kv)[:, None]
        vis &= overlap if per_batch else overlap.any(axis=0, keepdims=True)
        full &= False
    for v in visits:
        rows = (q_lo // v.block_q).astype(np.int32)  # the list row of each consumer block
        cols = (k_lo // v.block_kv).astype(np.int32)
        member = v.membership(_cdiv(kv_len, v.block_kv))
        vis &= member[:, :, rows][:, :, :, cols]
        if not transpose:  # at most L listed blocks, each covering this many consumer blocks
            steps = min(steps, v.length * int(np.bincount(cols).max()))
    steps = max(steps, 1)
    flags = jnp.where(full & vis, FULL_BIT, 0) | jnp.asarray(bits)
    flags = jnp.broadcast_to(flags, vis.shape)
    if transpose:
        vis, flags = vis.swapaxes(-1, -2), flags.swapaxes(-1, -2)
    # visible columns first, in increasing order (a stable sort on "not visible")
    order = jnp.argsort(~vis, axis=-1, stable=True).astype(jnp.int32)[..., :steps]
    count = jnp.sum(vis, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    index = jnp.where(jnp.arange(steps, dtype=jnp.int32) < count[..., None], order, last)
    return Tables(index=index, count=count, flags=jnp.take_along_axis(flags, index, axis=-1))
