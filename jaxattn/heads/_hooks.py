"""Hook objects, hook-point names, and the active set a model carries in ``ctx.hooks``.

Hook points are named in the TransformerLens style, per block i:

    blocks.i.resid_pre    [B, T, D]      the block's input
    blocks.i.attn.q       [B, T, N, H]   the attention op's queries (after qk_transform)
    blocks.i.attn.k       [B, S, K, H]   the op's keys ("mha": K kv heads, never repeated;
    blocks.i.attn.v       [B, S, K, V]   "mla": the naive path's per-head K = N, H = nope + P)
    blocks.i.attn.scores  [B, N, T, S]   scaled, soft-capped logits, masked keys -inf (fp32)
    blocks.i.attn.pattern [B, N, T, S]   attention probabilities (fp32, before dropout)
    blocks.i.attn.z       [B, T, N, V]   per-head outputs after head_gate: what ``out`` reads
    blocks.i.attn.out     [B, T, D]      the attention layer's output
    blocks.i.resid_mid    [B, T, D]      after the attention residual
    blocks.i.mlp.out      [B, T, D]      the MLP's output
    blocks.i.resid_post   [B, T, D]      the block's output

A hook is a :class:`Capture` (take the value out of the model) or an :class:`Intervene`
(replace it by ``fn(value, ctx)``). A :class:`HookSet` is what a model carries in
``Context.hooks`` (static): the layers ask it, at trace time, what to do at each point; an
empty set is falsy, and the layers then trace nothing of the mechanism. Captured values are
sown on the module at the point as :class:`HookCapture` variables (``nnx.Intermediate``), so
they leave ``nnx.jit`` / ``nnx.remat`` as module state; ``pop_captures`` takes them out.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "ATTN_POINTS",
    "BLOCK_POINTS",
    "PATTERN_MAX_BYTES",
    "Capture",
    "HookCapture",
    "HookSet",
    "Intervene",
    "hook_names",
    "hook_set",
    "mask_heads",
    "pop_captures",
    "scale_heads",
]

ATTN_POINTS = ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn.out")
BLOCK_POINTS = ("resid_pre", *ATTN_POINTS, "resid_mid", "mlp.out", "resid_post")
PROB_POINTS = ("attn.scores", "attn.pattern")  # [B, N, T, S]: rows and heads selectable
PATTERN_MAX_BYTES = 256 * 2**20
# the head axis of each per-head point (scale_heads / mask_heads)
_HEAD_AXIS = {
    "attn.q": 2,
    "attn.k": 2,
    "attn.v": 2,
    "attn.z": 2,
    "attn.scores": 1,
    "attn.pattern": 1,
}


@dataclasses.dataclass(frozen=True, eq=False)
class Capture:
    """Take the value at hook point(s) ``name`` out of the model.

    Attributes:
      name: a hook-point name, or a glob over them (``"blocks.*.attn.z"``).
      heads: ``attn.scores`` / ``attn.pattern`` only: query heads to keep (an int, a sequence
        of ints, a range; negative counts from the end); None: all N.
      positions: ``attn.scores`` / ``attn.pattern`` only: query rows to keep (as ``heads``);
        None: all T.
      max_bytes: ``attn.scores`` / ``attn.pattern`` only: refuse a capture larger than this
        (B · heads · positions · S · 4 bytes); None: no limit.
    """

    name: str
    heads: Any = None
    positions: Any = None
    max_bytes: int | None = PATTERN_MAX_BYTES


@dataclasses.dataclass(frozen=True, eq=False)
class Intervene:
    """Replace the value at hook point(s) ``name`` by ``fn(value, ctx)``.

    ``fn`` receives the value (layouts in the module docstring) and the block's
    ``jaxattn.layers.Context`` (``ctx.layer`` is the block index) and must return an array of
    the same shape and dtype. It may close over arrays (traced ones too: gradients flow to
    them). An intervention on ``attn.scores`` or ``attn.pattern`` routes that layer's attention
    through a materialised "xla"-style path (B · N · T · S probabilities); masked keys stay
    masked after a ``scores`` edit.
    """

    name: str
    fn: Callable[[jax.Array, Any], jax.Array]


class HookCapture(nnx.Intermediate):
    """A captured value (a tuple: one entry per run of the point), with ``hook_name``."""


def scale_heads(name: str, scales) -> Intervene:
    """Multiply each head's slice of a per-head point by ``scales`` [heads] (fixed or traced).

    Points and head axes: ``attn.q`` / ``attn.z`` (N), ``attn.k`` / ``attn.v`` (the kind's kv
    heads), ``attn.scores`` / ``attn.pattern`` (N).
    """
    axis = _head_axis(name)

    def fn(x, ctx):
        s = jnp.asarray(scales)
        if s.shape != (x.shape[axis],):
            raise ValueError(
                f"scale_heads({name!r}): scales must have shape [{x.shape[axis]}] (one per "
                f"head), got {s.shape}"
            )
        shape = [1] * x.ndim
        shape[axis] = -1
        return x * s.reshape(shape).astype(x.dtype)

    return Intervene(name, fn)


def mask_heads(name: str, heads) -> Intervene:
    """Zero the given heads (int or ints, checked against the head count) at ``name``."""
    axis = _head_axis(name)

    def fn(x, ctx):
        idx = resolve_indices(heads, x.shape[axis], f"mask_heads({name!r}) heads")
        keep = jnp.ones((x.shape[axis],), x.dtype).at[jnp.asarray(idx, jnp.int32)].set(0)
        shape = [1] * x.ndim
        shape[axis] = -1
        return x * keep.reshape(shape)

    return Intervene(name, fn)


def _head_axis(name: str) -> int:
    point = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    if point not in _HEAD_AXIS:
        raise ValueError(
            f"{name!r} has no head axis; per-head points are {sorted(_HEAD_AXIS)} "
            "(as blocks.<i>.<point>)"
        )
    return _HEAD_AXIS[point]


def resolve_indices(spec, size: int, what: str) -> tuple[int, ...]:
    """``spec`` (None, an int, a sequence or a range of ints) as indices in [0, size).

    Raises:
      ValueError: an index outside [-size, size), a duplicate, a bool or a non-int.
    """
    if spec is None:
        return tuple(range(size))
    items = (spec,) if isinstance(spec, (int, np.integer)) else spec
    if hasattr(items, "dtype"):  # a numpy or concrete jax int array
        if isinstance(items, jax.core.Tracer) or not np.issubdtype(items.dtype, np.integer):
            raise ValueError(f"{what} must be concrete ints (static), got {spec!r}")
        items = np.asarray(items).reshape(-1).tolist()
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, range)):
        raise ValueError(f"{what} must be an int, a sequence or a range of ints, got {spec!r}")
    out = []
    for i in items:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{what} must be ints, got {i!r} in {spec!r}")
        i = int(i)
        if not -size <= i < size:
            raise ValueError(f"{what}: index {i} is out of range for size {size}")
        out.append(i % size)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} has duplicates: {spec!r}")
    if not out:
        raise ValueError(f"{what} is empty")
    return tuple(out)


def hook_names(model) -> tuple[str, ...]:
    """Every hook-point name of ``model``: ``blocks.<i>.<point>`` for a model with ``layers``
    (``models.DecoderLM``), the bare ``attn.<point>`` names for one attention layer."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return ATTN_POINTS
    return tuple(f"blocks.{i}.{p}" for i in range(len(layers)) for p in BLOCK_POINTS)


def hook_set(model, hooks) -> HookSet | tuple:
    """``hooks`` (Capture / Intervene objects, or a HookSet) checked against ``model``'s
    hook points; ``()`` when there are none (the model then traces no hook code)."""
    if isinstance(hooks, HookSet):
        return hooks if hooks else ()
    if isinstance(hooks, (Capture, Intervene)):
        hooks = (hooks,)
    if not hooks:
        return ()
    return HookSet(hooks, hook_names(model))


def _unknown(name: str, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    layers = sorted({int(v.split(".")[1]) for v in valid if v.startswith("blocks.")})
    points = ATTN_POINTS if not layers else BLOCK_POINTS
    where = f"blocks.<i>.<point> for i in 0..{layers[-1]} and " if layers else ""
    return ValueError(
        f"unknown hook point {name!r}; close matches: {close or 'none'}; valid: {where}"
        f"point in {list(points)}"
    )


class HookSet:
    """The active hooks of one call, resolved against a model's point names.

    Static (part of ``Context``): hashed by identity, so a new HookSet traces anew. Falsy when
    empty. Layers call :meth:`point` (and the attention flow :meth:`attend` /
    :meth:`decode_inputs`) only when the set is truthy.

    Args:
      hooks: Capture / Intervene objects, applied in this order at each point.
      names: the model's valid point names (``hook_names(model)``).

    Raises:
      ValueError: an unknown name or a glob matching nothing (close matches listed), a
        non-hook object, two captures of one point, ``heads`` / ``positions`` on a point
        without query heads and rows.
    """

    def __init__(self, hooks: Sequence[Capture | Intervene], names: Sequence[str]):
        by_name: dict[str, list] = {}
        for h in hooks:
            if not isinstance(h, (Capture, Intervene)):
                raise ValueError(f"hooks must be Capture or Intervene objects, got {h!r}")
            if not isinstance(h.name, str):
                raise ValueError(f"hook name must be a string, got {h.name!r}")
            if isinstance(h, Intervene) and not callable(h.fn):
                raise ValueError(f"Intervene({h.name!r}).fn must be callable, got {h.fn!r}")
            matched = [n for n in names if fnmatch.fnmatchcase(n, h.name)]
            if not matched:
                raise _unknown(h.name, names)
            for n in matched:
                if isinstance(h, Capture):
                    rows = h.heads is not None or h.positions is not None
                    if rows and not n.endswith(PROB_POINTS):
                        raise ValueError(
                            f"Capture({h.name!r}): heads= / positions= select rows of "
                            f"{list(PROB_POINTS)} only, not {n!r} (slice the capture instead)"
                        )
                    if any(isinstance(o, Capture) for o in by_name.get(n, ())):
                        raise ValueError(f"two captures of hook point {n!r}")
                by_name.setdefault(n, []).append(h)
        self._by_name = {n: tuple(hs) for n, hs in by_name.items()}

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def __repr__(self) -> str:
        return f"HookSet({sorted(self._by_name)})"

    @staticmethod
    def full_name(ctx, point: str) -> str:
        """``blocks.<ctx.layer>.<point>`` (the bare point outside a block)."""
        return point if ctx.layer is None else f"blocks.{ctx.layer}.{point}"

    def at(self, ctx, point: str) -> tuple:
        """The hooks at ``point`` of the block ``ctx`` is in."""
        return self._by_name.get(self.full_name(ctx, point), ())

    def point(self, module, ctx, point: str, value, *, select=None):
        """Run the hooks at ``point`` on ``value``: captures record it (through ``select``
        for row-selecting captures), interventions replace it. Returns the (new) value."""
        name = self.full_name(ctx, point)
        for h in self._by_name.get(name, ()):
            if isinstance(h, Capture):
                sow(module, name, value if select is None else select(h, value))
            else:
                value = intervene(h, name, value, ctx)
        return value

    def attend(self, layer, q, kv, ctx):
        """The attention op with the hooks at q, k, v, scores, pattern (see ``_attend``)."""
        from jaxattn.heads._attend import hooked_attend

        return hooked_attend(self, layer, q, kv, ctx)

    def decode_inputs(self, layer, q, kv, ctx) -> None:
        """Capture q, k, v of the new tokens in a cached step (``attention_inputs`` layout).

        Raises:
          NotImplementedError: an intervention at q / k / v, or any scores / pattern hook (the
            cache owns its attention; run the full sequence through ``__call__`` instead).
        """
        for point in ATTN_POINTS:
            for h in self.at(ctx, point):
                name = self.full_name(ctx, point)
                if point in PROB_POINTS:
                    raise NotImplementedError(
                        f"hook {name!r} during cached decoding: the cache attends itself and "
                        "returns no probabilities; run the whole sequence through the model's "
                        "__call__ (causal: the same probabilities) to get them"
                    )
                if isinstance(h, Intervene) and point in ATTN_POINTS[:3]:
                    raise NotImplementedError(
                        f"Intervene({h.name!r}) at {name!r} during cached decoding: the cache "
                        "attends in the kind's own layout; intervene on attn.z or the residual"
                    )
        if any(self.at(ctx, p) for p in ATTN_POINTS[:3]):
            from jaxattn.heads._attend import has_operands

            if not has_operands(layer):
                raise NotImplementedError(
                    f"{type(layer).__name__} has no attention_inputs: no q / k / v hook points"
                )
            q_BTNH, k_BTKH, v_BTKV = layer.attention_inputs(q, kv, ctx)
            for point, x in zip(ATTN_POINTS[:3], (q_BTNH, k_BTKH, v_BTKV), strict=True):
                self.point(layer, ctx, point, x)


def sow(module, name: str, value) -> None:
    """Append ``value`` to the :class:`HookCapture` of point ``name`` on ``module``."""
    attr = "hook_" + name.replace(".", "_")
    var = getattr(module, attr, None)
    if isinstance(var, HookCapture):
        var.set_value(var.get_value() + (value,))
    else:
        setattr(module, attr, HookCapture((value,), hook_name=name))


def intervene(h: Intervene, name: str, value, ctx):
    """``h.fn(value, ctx)``, checked to keep ``value``'s shape and dtype."""
    out = h.fn(value, ctx)
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise ValueError(
            f"Intervene({h.name!r}) at {name!r} returned {type(out).__name__}, not an array"
        )
    if out.shape != value.shape or out.dtype != value.dtype:
        raise ValueError(
            f"Intervene({h.name!r}) at {name!r} must return {value.dtype}{list(value.shape)} "
            f"(the value's shape and dtype), got {out.dtype}{list(out.shape)}"
        )
    return out


def pop_captures(model) -> dict[str, Any]:
    """Remove every :class:`HookCapture` from ``model`` and return them by point name.

    Returns:
      {name: value} in point order (a dict returned through ``jax.jit`` has sorted keys); a point
      run k > 1 times since the last pop (a model called twice) gives a tuple of its k values.
    """
    state = nnx.pop(model, HookCapture)
    found = {}
    for _, var in nnx.to_flat_state(state):
        values = var.get_value()
        found[var.hook_name] = values[0] if len(values) == 1 else tuple(values)
    return dict(sorted(found.items(), key=lambda kv: _order(kv[0])))


def _order(name: str):
    parts = name.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[1].isdigit():
        return (int(parts[1]), BLOCK_POINTS.index(parts[2]) if parts[2] in BLOCK_POINTS else 99)
    return (-1, ATTN_POINTS.index(name) if name in ATTN_POINTS else 99)
