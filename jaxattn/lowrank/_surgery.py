"""Model surgery by path: find every ``Linear`` of a model and fill its adapter slot.

Paths are the module paths of the projections, ``/``-joined: ``layers/0/attn/q``,
``layers/3/mlp/down``, ``lm_head`` (their kernels live at ``<path>/kernel``). A pattern is a
regular expression searched in the path (``re.search``), so ``attn/(q|v)$`` adapts every
query and value projection of every layer, of every attention kind.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import Linear

__all__ = ["linear_paths", "attach", "detach", "split_kernels", "per_kernel"]


def _path(parts) -> str:
    return "/".join(str(p) for p in parts)


def linear_paths(model: nnx.Module) -> dict[str, Linear]:
    """Every ``Linear`` of ``model`` by its module path, in traversal order."""
    return {_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def split_kernels(model: nnx.Module, paths) -> tuple:
    """``nnx.split`` of ``model`` into (graphdef, the base kernels of the projections at
    ``paths``, everything else), for a function of those kernels alone (e.g. their gradient)."""
    want = {f"{p}/kernel" for p in paths}
    return nnx.split(model, lambda path, _: _path(path) in want, ...)


def per_kernel(model: nnx.Module, tree, paths) -> dict:
    """``{path: array [*in, *out]}`` from ``tree``, a state shaped like the kernels of
    :func:`split_kernels` (gradients, Fisher, ...); a tied head's [*out, *in] is reordered."""
    flat = {_path(p): v[...] for p, v in nnx.to_flat_state(tree)}
    lins = linear_paths(model)
    out = {}
    for p in paths:
        x = flat[f"{p}/kernel"]
        if lins[p].transposed:  # a tied head stores [*out, *in]
            n_out = len(lins[p].out_shape)
            x = jnp.transpose(x, tuple(range(n_out, x.ndim)) + tuple(range(n_out)))
        out[p] = x
    return out


def _select(model: nnx.Module, pattern: str) -> dict[str, Linear]:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {err}") from None
    found = linear_paths(model)
    chosen = {p: m for p, m in found.items() if regex.search(p)}
    if not chosen:
        close = difflib.get_close_matches(pattern, list(found), n=5, cutoff=0.3)
        raise ValueError(
            f"pattern {pattern!r} matches no projection of {type(model).__name__}; "
            f"close matches: {close}; projections look like {list(found)[:6]}"
        )
    return chosen


def attach(model: nnx.Module, pattern: str, make_adapter: Callable[[str, Linear], object]):
    """Put ``make_adapter(path, linear)`` in the adapter slot of every matching ``Linear``.

    Args:
      model: any NNX module holding ``Linear`` projections (e.g. a ``models.DecoderLM``).
      pattern: regular expression searched in each projection's module path.
      make_adapter: builds the adapter of one projection (an object with ``delta`` and
        ``delta_kernel``, see ``jaxattn.layers.Adapter``); its parameters should be
        ``jaxattn.layers.AdapterParam``.

    Returns:
      The adapted paths, in model order.

    Raises:
      ValueError: the pattern matches nothing (close matches listed), or a matching projection
        already has an adapter (detach it first).
    """
    chosen = _select(model, pattern)
    taken = [p for p, m in chosen.items() if m.adapter is not None]
    if taken:
        raise ValueError(f"projections {taken} already have an adapter; detach them first")
    for path, linear in chosen.items():
        linear.adapter = make_adapter(path, linear)
    return list(chosen)


def detach(model: nnx.Module, pattern: str = ".*") -> list[str]:
    """Empty the adapter slot of every matching ``Linear`` that has one; returns their paths."""
    done = []
    for path, linear in linear_paths(model).items():
        if linear.adapter is not None and re.search(pattern, path):
            linear.adapter = None
            done.append(path)
    return done
