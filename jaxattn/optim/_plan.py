"""Which leaves a low-rank optimizer projects, how each is viewed as a matrix, which side.

A leaf of shape ``[*in, *out]`` is viewed as the matrix ``[prod(in), prod(out)]``: its first
``fan_in_axes`` dims are the rows (the fan-in of a ``[*in, *out]`` projection kernel), the rest
the columns. The default ``fan_in_axes=1`` gives ``[shape[0], prod(shape[1:])]``.

The side(s) a leaf is projected on follow galore-torch's ``proj_type`` on that matrix
(``std``: the smaller side, the right one when square; ``reverse_std``: the larger; ``left``,
``right``; ``full``: both). A side whose projector would be square (rank == that side's size)
spans the whole space: it is dropped, and a leaf with no side left is an **identity** leaf,
updated by the inner transform exactly as if it were not projected (scaled by ``scale``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import optax

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")

# rank: one int for every leaf with >= 2 dims, or (path, shape) -> int | None (None: not projected)
Rank = int | Callable[[str, tuple[int, ...]], "int | None"]
FanIn = int | Callable[[str, tuple[int, ...]], int]


def is_masked(x) -> bool:
    """Whether ``x`` is optax's placeholder for a leaf another transform owns."""
    return isinstance(x, optax.MaskedNode)


def path_string(path) -> str:
    """``"layers/0/attn/q/kernel"`` for a pytree key path."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def flatten(tree) -> tuple[list[str], list[Any], Any]:
    """Paths, leaves and treedef of ``tree``; optax ``MaskedNode``s count as leaves, so trees of
    per-leaf state (which hold a ``MaskedNode`` where a leaf has none) line up with it."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)
    return [path_string(p) for p, _ in with_path], [x for _, x in with_path], treedef


def leaves(tree) -> list[Any]:
    """The leaves of a per-leaf state tree, ``MaskedNode``s included (see :func:`flatten`)."""
    return jax.tree.leaves(tree, is_leaf=is_masked)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one leaf of shape ``shape`` is projected: matrix view ``[m, n]``, rank ``rank`` and
    the projected sides (``left``: ``P_mr`` with ``R = Pᵀ G`` of shape ``[r, n]``; ``right``:
    ``Q_rn`` with ``R = G Qᵀ`` of shape ``[m, r]``; both: ``R = Pᵀ G Qᵀ``, ``[r, r]``)."""

    path: str
    shape: tuple[int, ...]
    m: int
    n: int
    rank: int
    left: bool
    right: bool

    @property
    def identity(self) -> bool:
        return not (self.left or self.right)

    @property
    def low_shape(self) -> tuple[int, ...]:
        """Shape of the projected gradient the inner transform sees."""
        if self.identity:
            return self.shape
        return (self.rank if self.left else self.m, self.rank if self.right else self.n)


def matrix_view(shape: tuple[int, ...], fan_in_axes: int) -> tuple[int, int]:
    """``(prod(shape[:fan_in_axes]), prod(shape[fan_in_axes:]))``."""
    return math.prod(shape[:fan_in_axes]), math.prod(shape[fan_in_axes:])


def _sides(proj_type: str, m: int, n: int, r: int) -> tuple[bool, bool]:
    left = {"std": m < n, "reverse_std": m >= n, "left": True, "right": False, "full": True}
    right = {"std": m >= n, "reverse_std": m < n, "left": False, "right": True, "full": True}
    # a square projector spans the whole side: the identity, not a rotation
    return left[proj_type] and r < m, right[proj_type] and r < n


def check_proj_type(proj_type: str) -> None:
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type={proj_type!r} is not one of {PROJ_TYPES}")


def make_plans(
    tree, *, rank: Rank, fan_in_axes: FanIn, proj_type: str, mask=None, who: str = "galore"
) -> list[LeafPlan | None]:
    """One :class:`LeafPlan` (or None: not projected) per leaf of ``tree`` (see :func:`flatten`).

    Args:
      tree: parameters or gradients (arrays or shape structs).
      rank: an int for every leaf with >= 2 dims (leaves with fewer are not projected), or
        ``rank(path, shape) -> int | None``.
      fan_in_axes: leading dims that form the matrix rows: an int or ``(path, shape) -> int``.
      proj_type: one of ``PROJ_TYPES``.
      mask: optional pytree of bools like ``tree`` (or a callable building it from ``tree``):
        leaves where it is False are not projected.

    Raises:
      ValueError: a rank outside ``[1, min(m, n)]`` (naming the leaf), a rank asked for a leaf
        with fewer than 2 dims, a bad ``fan_in_axes``, or a selection with no leaf at all.
    """
    paths, xs, _ = flatten(tree)
    if mask is not None:
        mask_tree = mask(tree) if callable(mask) else mask
        keep = leaves(mask_tree)
        if len(keep) != len(xs):
            raise ValueError(f"{who}: mask has {len(keep)} leaves, the parameters {len(xs)}")
    else:
        keep = [True] * len(xs)
    plans: list[LeafPlan | None] = []
    for path, x, kept in zip(paths, xs, keep):
        plans.append(
            None if is_masked(x) or not kept else _plan(path, x, rank, fan_in_axes, proj_type, who)
        )
    if not any(p is not None for p in plans):
        raise ValueError(
            f"{who}: rank={rank!r}{'' if mask is None else ' with mask'} selects no parameter to "
            f"project (it needs a leaf with >= 2 dims); paths look like {paths[:3]}"
        )
    return plans


def _plan(path, x, rank, fan_in_axes, proj_type, who) -> LeafPlan | None:
    shape = tuple(x.shape)
    r = rank(path, shape) if callable(rank) else (rank if len(shape) >= 2 else None)
    if r is None:
        return None
    if len(shape) < 2:
        raise ValueError(
            f"{who}: rank={r} asked for the parameter at {path!r} of shape {shape}; only leaves "
            "with >= 2 dims can be projected"
        )
    k = fan_in_axes(path, shape) if callable(fan_in_axes) else fan_in_axes
    if not (isinstance(k, int) and 1 <= k < len(shape)):
        raise ValueError(
            f"{who}: fan_in_axes={k!r} for the parameter at {path!r} of shape {shape} must be an "
            f"int in [1, {len(shape) - 1}]"
        )
    m, n = matrix_view(shape, k)
    if not (isinstance(r, int) and 1 <= r <= min(m, n)):
        raise ValueError(
            f"{who}: rank={r!r} for the parameter at {path!r} (shape {shape}, matrix [{m}, {n}]) "
            f"must be an int in [1, min(m, n) = {min(m, n)}]"
        )
    left, right = _sides(proj_type, m, n, r)
    return LeafPlan(path, shape, m, n, r, left, right)
