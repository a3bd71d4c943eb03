"""Shardings for optimizer states, derived from the parameters' PartitionSpecs.

A low-rank state leaf keeps the sharding of every parameter dim it keeps. For a parameter
viewed as the matrix ``[m, n]`` with spec ``(s_m, s_n)`` (see below for > 2 dims):

* a state leaf with the parameter's own shape (Adam moments of a leaf that is not projected,
  quantised codes of one) gets the parameter's spec;
* a 2-D state leaf gets ``s_m`` on a dim of size ``m`` and ``s_n`` on a dim of size ``n``,
  the rank dim is replicated: the left projector ``P_mr`` is ``(s_m, None)``, the right one
  ``Q_rn`` ``(None, s_n)``, the moments ``R_rn`` ``(None, s_n)`` / ``R_mr`` ``(s_m, None)``,
  ``R_rr`` replicated. The rank ``r`` of a projected side is always smaller than that side,
  so the sizes are unambiguous;
* anything else (counts, DCT indices, Fira's norms, quantisation scales) is replicated.

Matrix view of a parameter with more dims: the spec of a merged group of dims (the first
``fan_in_axes`` dims, or the rest) is the spec of its first dim when no other dim of the group
is sharded (row-major merging keeps that layout); otherwise the merged dim is replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from jaxattn.optim._plan import FanIn, flatten, is_masked, matrix_view
from jaxattn.optim.quantized import QuantizedArray

__all__ = ["state_spec", "state_partition_specs"]


def _merged(entries) -> str | tuple | None:
    if any(e is not None for e in entries[1:]):
        return None
    return entries[0]


def state_spec(
    param_spec: PartitionSpec, param_shape, state_shape, fan_in_axes: int = 1
) -> PartitionSpec:
    """The PartitionSpec of one optimizer-state leaf of shape ``state_shape`` belonging to a
    parameter of shape ``param_shape`` sharded as ``param_spec`` (module docstring)."""
    param_shape, state_shape = tuple(param_shape), tuple(state_shape)
    entries = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
    if state_shape == param_shape:
        return PartitionSpec(*entries)
    if len(state_shape) != 2 or len(param_shape) < 2:
        return PartitionSpec()
    k = fan_in_axes if len(param_shape) > 2 else 1
    m, n = matrix_view(param_shape, k)
    s_m, s_n = _merged(entries[:k]), _merged(entries[k:])
    return PartitionSpec(s_m if state_shape[0] == m else None, s_n if state_shape[1] == n else None)


def _special(x) -> bool:
    return is_masked(x) or isinstance(x, QuantizedArray)


def state_partition_specs(opt_state, params, param_specs, *, fan_in_axes: FanIn = 1):
    """PartitionSpecs for every leaf of ``opt_state`` (a tree like it).

    Every subtree of the state with the parameters' structure (optax keeps per-parameter
    state in such trees: Adam's ``mu``/``nu``, GaLore's projectors, ...) is mapped leaf by
    leaf with :func:`state_spec`; the rest is replicated. Use with ``jax.jit(tx.init,
    out_shardings=...)`` and the train step's shardings.

    Args:
      opt_state: the state or its shapes (``jax.eval_shape(tx.init, params)``).
      params: the parameters (arrays or shape structs), as given to ``tx.init``.
      param_specs: a tree like ``params`` of ``PartitionSpec``s.
      fan_in_axes: as given to the low-rank transform (int or ``(path, shape) -> int``).

    Returns:
      A tree like ``opt_state`` with a ``PartitionSpec`` per array leaf (``MaskedNode``s stay).
    """
    paths, xs, treedef = flatten(params)
    specs = jax.tree.leaves(
        param_specs, is_leaf=lambda s: isinstance(s, PartitionSpec) or is_masked(s)
    )
    if len(specs) != len(xs):
        raise ValueError(f"param_specs has {len(specs)} leaves, params {len(xs)}")

    def fan_in(path, x):
        return fan_in_axes(path, tuple(x.shape)) if callable(fan_in_axes) else fan_in_axes

    def param_like(node) -> bool:
        return jax.tree.structure(node, is_leaf=_special) == treedef

    def one(node, path, x, spec):
        if is_masked(node) or is_masked(x):
            return node if is_masked(node) else PartitionSpec()
        if isinstance(node, QuantizedArray):
            codes = state_spec(spec, x.shape, node.codes.shape, fan_in(path, x))
            return QuantizedArray(codes, PartitionSpec(), PartitionSpec())
        return state_spec(spec, x.shape, node.shape, fan_in(path, x))

    def map_node(node):
        if is_masked(node):
            return node
        if not param_like(node):
            return PartitionSpec()
        nodes = jax.tree.leaves(node, is_leaf=_special)
        return treedef.unflatten([one(*a) for a in zip(nodes, paths, xs, specs)])

    return jax.tree.map(map_node, opt_state, is_leaf=lambda n: param_like(n) or is_masked(n))
