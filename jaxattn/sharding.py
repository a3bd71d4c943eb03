"""Logical axis names -> mesh axes: the one rules table of jaxattn.

Parameters are annotated with logical names (``nnx.with_partitioning(init, ("embed", "mlp"))``)
and activations with the names below; this module alone decides which mesh axis each name is
split over. Mesh axes are ``data``, ``fsdp``, ``tensor`` and ``sequence``; a mesh need not have
all of them (axes it lacks are dropped from the specs).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES",
    "LOGICAL_RULES",
    "logical_to_spec",
    "logical_sharding",
    "make_mesh",
    "constrain",
]

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> mesh axis (or tuple of axes), None = replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": "sequence",
    "kv_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "q_lora": None,
    "kv_lora": None,
    "lora_rank": None,
    "layers": None,
    "norm": None,
    "experts": None,
}


def logical_to_spec(
    names: Sequence[str | None],
    mesh: Mesh | None = None,
    rules: dict[str, str | tuple[str, ...] | None] | None = None,
    *,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for a tensor whose dims carry logical ``names``.

    Mesh axes absent from ``mesh`` (when given) are dropped, and a mesh axis is used at most
    once per spec (a later dim that maps to an axis already taken is replicated). With the
    tensor's ``shape`` (and a ``mesh``), a dim is split only over the leading mesh axes whose
    sizes multiply to a divisor of it; the others are dropped for that dim, e.g. a single
    shared kv head (MQA, LAMA) stays replicated on a "tensor" axis of 2.

    Raises:
      ValueError: a name that is not in the rules table, or ``shape`` of another rank.
    """
    rules = LOGICAL_RULES if rules is None else rules
    present = set(mesh.axis_names) if mesh is not None else set(MESH_AXES)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"shape={tuple(shape)} has {len(shape)} dims, names={tuple(names)}")
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"logical axis name {name!r} is not in the rules table {sorted(rules)}"
            )
        axes = rules[name]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in present and a not in used)
        if shape is not None and mesh is not None:
            kept, size = [], 1
            for a in axes:
                if shape[i] % (size * mesh.shape[a]):
                    break
                kept.append(a)
                size *= mesh.shape[a]
            axes = tuple(kept)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)


def logical_sharding(
    names: Sequence[str | None], mesh: Mesh, rules=None, *, shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding over ``mesh`` for a tensor with logical dim ``names`` (and ``shape``: dims
    the mesh axes do not divide are replicated, see :func:`logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape=shape))


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    """A mesh with the named axes and sizes, e.g. ``{"data": 2, "fsdp": 2, "tensor": 2}``.

    Axes are in Auto mode: jaxattn places parameters and batches with ``jax.jit`` in/out
    shardings and constrains activations at block boundaries, letting XLA propagate the rest
    (``jax.make_mesh``'s default Explicit axes would demand an output sharding on every op
    whose result sharding is ambiguous, such as an embedding gather).

    Raises:
      ValueError: unknown axis names, or a product that differs from the device count.
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
    devices = jax.devices() if devices is None else list(devices)
    size = 1
    for n in shape.values():
        size *= n
    if size != len(devices):
        raise ValueError(f"mesh shape {shape} needs {size} devices, but {len(devices)} are given")
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=auto, devices=devices)


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None) -> jax.Array:
    """Constrain activation ``x`` to the sharding of its logical ``names`` (block boundaries).

    A no-op outside a mesh context when ``mesh`` is None.
    """
    if mesh is None:
        mesh = _current_mesh()
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh))
    return jax.lax.with_sharding_constraint(x, logical_sharding(names, mesh))


def _current_mesh():
    """The mesh set with ``jax.set_mesh``/``jax.sharding.use_mesh``, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh
