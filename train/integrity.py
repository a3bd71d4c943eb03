"""Checkpoint integrity: per-leaf checksums, verification that names the bad leaves, and
one-line summaries of read errors.

Every step a :class:`train.checkpoints.Checkpointer` writes stores, in its ``meta`` item, a
64-bit checksum of every leaf of ``params`` and of ``train`` (``meta["leaf_checksums"]`` =
``{"algorithm": ALGORITHM, "params": {path: checksum}, "train": {...}}``, paths such as
``"layers/0/mlp/..."``; a reader refuses an algorithm it does not know). Each element's bits
are mixed with its position by a bijective integer hash (``fmix(bits + index * c + seed)``,
MurmurHash3's finaliser) before a wrapping sum, so changing any single element always changes
the checksum, and a sum of 32-bit words is exact under any sharding. Several changed elements escape
detection only by chance (two independent 32-bit lanes).

Readers verify the leaves they load and refuse a mismatch, naming the step directory and the
parameter paths; they also refuse non-finite floating-point values, which training never
saves. Checkpoints written before per-leaf checksums hold one whole-tree checksum of
``(params, train)`` (``meta["checksum"]``, :func:`legacy_checksum`); they are verified with it,
which cannot name the bad leaf.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from train.optim import path_string

__all__ = [
    "CheckpointError",
    "ALGORITHM",
    "all_finite",
    "leaf_checksums",
    "legacy_checksum",
    "verify",
    "one_line",
    "tree_signature",
    "describe_mismatch",
    "tree_digest",
]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, fails its integrity check, or holds non-finite
    values; the message names the step directory and, where known, the parameter paths."""


def _bits_u32(leaf) -> jax.Array:
    """The raw bits of ``leaf`` as uint32, same shape (8-byte items: a trailing axis of two
    words). Nothing is reshaped, so a sharded leaf stays sharded (no gather)."""
    leaf = jnp.asarray(leaf)
    if leaf.dtype == jnp.bool_:
        return leaf.astype(jnp.uint32)
    size = leaf.dtype.itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    unsigned = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
    """uint32 row-major position of every element of an array of ``shape`` (wrapping past
    2^32 elements), built from per-axis iotas so it shards like the array."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _fmix(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


# per lane: an odd multiplier placing each index, and a seed; the lanes are independent
_LANES = ((0x9E3779B1, 0x7F4A7C15), (0x85EBCA77, 0x165667B1))
# stored with the checksums: a reader refuses checksums made by an algorithm it does not know
ALGORITHM = "fmix32x2-v1"


@jax.jit
def _leaf_digest(leaf) -> tuple[jax.Array, jax.Array]:
    """``([2] uint32, bool[])``: two independent position-mixed wrapping sums of ``leaf``'s
    bits, and whether it is all finite. Jitted per leaf, not per tree: leaves of one shape
    (every layer's) share one small executable."""
    bits = _bits_u32(leaf)
    index = _flat_index(bits.shape)
    digest = []
    for mult, seed in _LANES:
        # for a fixed index, bits -> term is a bijection, so any changed element changes the sum
        term = _fmix(bits + index * jnp.uint32(mult) + jnp.uint32(seed))
        digest.append(jnp.sum(term, dtype=jnp.uint32) ^ jnp.uint32(bits.size % 2**32))
    return jnp.stack(digest), _all_finite(leaf)


def _all_finite(leaf) -> jax.Array:
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.ones((), jnp.bool_)
    return jnp.all(jnp.isfinite(leaf))


def all_finite(tree) -> jax.Array:
    """Traceable bool[]: every floating-point element of ``tree`` is finite."""
    flags = [_all_finite(x) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.ones((), jnp.bool_)


def _flat(tree) -> dict:
    return {path_string(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# leaves up to this many elements on one device are digested on the host (numpy, the same
# arithmetic): no per-shape compile, which dominated small runs' checkpoint time
_HOST_MAX = 1 << 22


def _digest(leaf):
    single = isinstance(leaf, np.ndarray | np.generic) or (
        isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) == 1
    )
    # dtypes jax would canonicalise (float64 without x64, ...) take the jax path, as before
    if single and np.size(leaf) <= _HOST_MAX:
        dtype = np.asarray(leaf).dtype if isinstance(leaf, np.ndarray | np.generic) else leaf.dtype
        if dtype.itemsize <= 4 and jax.dtypes.canonicalize_dtype(dtype) == dtype:
            return _host_digest(np.asarray(leaf))
    return jax.device_get(_leaf_digest(leaf))


def _host_digest(a: np.ndarray):
    """:func:`_leaf_digest` in numpy, for items of at most 4 bytes (uint32 arithmetic wraps
    the same way; the sum is over the row-major flat order, as there)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    if a.dtype == np.bool_ or a.dtype.itemsize == 4:
        bits = flat.view(np.uint32) if a.dtype != np.bool_ else flat.astype(np.uint32)
    else:
        bits = flat.view({2: np.uint16, 1: np.uint8}[a.dtype.itemsize]).astype(np.uint32)
    index = (np.arange(bits.size, dtype=np.uint64) % (1 << 32)).astype(np.uint32)
    digest = []
    for mult, seed in _LANES:
        h = bits + index * np.uint32(mult) + np.uint32(seed)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
        digest.append(np.sum(h, dtype=np.uint32) ^ np.uint32(bits.size % 2**32))
    finite = True
    if jnp.issubdtype(a.dtype, jnp.inexact):
        finite = bool(np.all(np.isfinite(flat.astype(np.float32))))
    return np.stack(digest), np.bool_(finite)


def leaf_checksums(tree) -> tuple[dict[str, int], dict[str, bool]]:
    """Per-leaf 64-bit checksums and finiteness of a pytree of (possibly sharded) arrays.

    Returns:
      ``({path: checksum}, {path: all finite})``, paths as ``"a/b/0/c"``.
    """
    # one leaf at a time: XLA:CPU can deadlock when many small collective programs over the
    # same devices are in flight at once
    digests = {k: _digest(x) for k, x in _flat(tree).items()}
    sums = {k: int(d[0]) | (int(d[1]) << 32) for k, (d, _) in digests.items()}
    return sums, {k: bool(ok) for k, (_, ok) in digests.items()}


@jax.jit
def _legacy(tree) -> jax.Array:
    total = jnp.zeros((), jnp.uint32)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        leaf = jnp.asarray(leaf).reshape(-1)
        if leaf.dtype.itemsize == 4:
            bits = jax.lax.bitcast_convert_type(leaf, jnp.uint32)
        elif leaf.dtype.itemsize == 2:
            bits = jax.lax.bitcast_convert_type(leaf, jnp.uint16).astype(jnp.uint32)
        else:
            bits = leaf.astype(jnp.uint32)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
        total = total + jnp.sum(bits * weights, dtype=jnp.uint32) * jnp.uint32(2 * i + 1)
    return total


def legacy_checksum(tree) -> int:
    """The whole-tree uint32 checksum of checkpoints written before per-leaf checksums
    (over ``(params, train)`` in pytree order); kept only to verify those checkpoints."""
    return int(jax.device_get(_legacy(tree)))


def verify(items: dict, meta: dict, where: str) -> None:
    """Check restored items against the checksums stored in ``meta``.

    Args:
      items: ``{"params": tree, "train": tree}`` (either may be missing when the stored
        checksums are per leaf; a legacy whole-tree checksum needs both).
      meta: the step's metadata.
      where: the step directory, for the messages.

    Raises:
      CheckpointError: a checksum mismatch (naming the leaves), a non-finite value, or no
        checksum at all.
    """
    stored = meta.get("leaf_checksums")
    finite_bad = []
    if stored is not None:
        if stored.get("algorithm") != ALGORITHM:
            raise CheckpointError(
                f"{where}: checksums made by {stored.get('algorithm')!r}, which this version "
                f"cannot verify (it knows {ALGORITHM!r})"
            )
        bad = []
        for item, tree in items.items():
            sums, finite = leaf_checksums(tree)
            expected = stored.get(item, {})
            bad += [f"{item}/{k}" for k in sorted(sums) if expected.get(k) != sums[k]]
            finite_bad += [f"{item}/{k}" for k in sorted(finite) if not finite[k]]
        if bad:
            raise CheckpointError(
                f"{where}: checksum mismatch in {_some(bad)}: the files holding "
                f"{'this leaf' if len(bad) == 1 else 'these leaves'} are corrupted"
            )
    elif "checksum" in meta:
        if set(items) != {"params", "train"}:
            raise ValueError("a legacy whole-tree checksum needs both params and train")
        if legacy_checksum((items["params"], items["train"])) != meta["checksum"]:
            raise CheckpointError(
                f"{where}: checksum mismatch (params + train state; this checkpoint predates "
                "per-leaf checksums, so the corrupted parameter cannot be named)"
            )
        for item, tree in items.items():
            finite_bad += [f"{item}/{k}" for k, ok in leaf_checksums(tree)[1].items() if not ok]
    else:
        raise CheckpointError(f"{where}: the metadata holds no checksum; cannot verify it")
    if finite_bad:
        raise CheckpointError(f"{where}: non-finite values in {_some(finite_bad)}")


def _some(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# TensorStore's message for a leaf it cannot read from an OCDBT database
_OCDBT_ERROR = re.compile(
    r'Error reading "(?P<key>[^"]+?)/[\d.]+" in OCDBT database at local file '
    r'"(?P<dir>[^"]+?)/?": (?P<why>.*)'
)


def one_line(err: BaseException, limit: int = 300) -> str:
    """A one-line summary of an exception and its causes (TensorStore reprs and the like
    dropped): the innermost informative message, prefixed by the exception type; a leaf
    TensorStore cannot read is named by its path (``params/layers/0/...``)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in reversed(chain):
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if text and "TensorStore(" not in text and "<bound method" not in text:
            match = _OCDBT_ERROR.search(text)
            if match:
                leaf = f"{os.path.basename(match['dir'])}/{match['key'].replace('.', '/')}"
                return f"cannot read {leaf}: {match['why']}"[:limit]
            return f"{type(e).__name__}: {text[:limit]}"
    return type(chain[0]).__name__


def tree_signature(tree) -> dict[str, tuple]:
    """``{path: (shape, dtype name)}`` of a pytree of arrays or array metadata."""
    return {
        path_string(p): (tuple(x.shape), np.dtype(x.dtype).name)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def describe_mismatch(saved: dict, wanted: dict, limit: int = 6) -> str:
    """What differs between two :func:`tree_signature` dicts ("" when they agree)."""
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shapes = [
        f"{k} {saved[k][0]}/{saved[k][1]} saved vs {wanted[k][0]}/{wanted[k][1]} wanted"
        for k in sorted(set(saved) & set(wanted))
        if saved[k] != wanted[k]
    ]
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_some(missing, limit)}")
    if extra:
        parts.append(f"not in the model: {_some(extra, limit)}")
    if shapes:
        parts.append(f"different shape/dtype: {_some(shapes, limit)}")
    return "; ".join(parts)


def tree_digest(tree) -> str:
    """sha256 (hex) over every leaf's path and checksum: names one exact set of parameters
    (a fine-tuning checkpoint's reference to its base)."""
    import hashlib
    import json

    sums, _ = leaf_checksums(tree)
    return hashlib.sha256(json.dumps(sorted(sums.items())).encode()).hexdigest()
