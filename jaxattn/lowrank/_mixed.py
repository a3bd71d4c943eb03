"""Mixed-adapter batches: stack n single LoRA adapters into a ``lora_bank`` and back.

``stack_adapters`` builds a ``LoRABank`` (``jaxattn.lowrank.methods.lora_bank``, the
S-LoRA / Punica gather) from n LoRA-style adapters of one projection, each given as an
``(a [*in, r_i], b [r_i, *out], scale)`` tuple or an object with ``a``, ``b``, ``scale``
attributes (e.g. a ``lora`` adapter; ``nnx.Variable`` attributes are read with ``[...]``).
Ranks may differ: factors are zero-padded to the largest rank, which leaves every adapter's
delta ``scale_i * x @ a_i @ b_i`` exactly unchanged. ``unstack`` returns the tuples again,
trimmed to each adapter's rank.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.lowrank._factors import kernel_axes
from jaxattn.lowrank.methods.lora_bank import LoRABank

__all__ = ["stack_adapters", "unstack", "mix"]


def _value(v):
    return v[...] if isinstance(v, nnx.Variable) else v


def _parts(i, adapter):
    if isinstance(adapter, tuple | list):
        if len(adapter) != 3:
            raise ValueError(f"adapters[{i}] must be (a, b, scale), got {len(adapter)} items")
        a, b, scale = adapter
    elif all(hasattr(adapter, k) for k in ("a", "b", "scale")):
        a, b, scale = adapter.a, adapter.b, adapter.scale
    elif all(hasattr(adapter, k) for k in ("a", "b", "scaling")):  # a LoRA of methods/lora.py
        if getattr(adapter, "magnitude", None) is not None:
            raise ValueError(f"adapters[{i}] is a DoRA adapter; a bank stacks plain LoRA ones")
        a, b, scale = adapter.a, adapter.b, adapter.scaling
    else:
        raise ValueError(
            f"adapters[{i}] must be an (a, b, scale) tuple or have a, b, scale attributes, "
            f"got {type(adapter).__name__}"
        )
    a, b = jnp.asarray(_value(a)), jnp.asarray(_value(b))
    scale = np.asarray(_value(scale), np.float32)
    if scale.size != 1:
        raise ValueError(f"adapters[{i}].scale must be a scalar, got shape {scale.shape}")
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"adapters[{i}]: a must be [*in, r] and b [r, *out] with the same r, "
            f"got a {a.shape} and b {b.shape}"
        )
    return a, b, float(scale.reshape(()))


def stack_adapters(adapters, *, linear=None) -> LoRABank:
    """A ``LoRABank`` whose adapter i is ``adapters[i]`` (row b of a batch then uses
    ``adapters[sequence_ids_B[b]]``).

    Args:
      adapters: n >= 1 items, each ``(a [*in, r_i], b [r_i, *out], scale)`` or an object with
        ``a``, ``b``, ``scale`` attributes; all of one projection (same in and out shapes).
      linear: the ``Linear`` they adapt (optional): the bank's factors then take its logical
        axes (sharding), as ``lora_bank`` builds them.

    Raises:
      ValueError: an empty list, a malformed item, or items of different in / out shapes.
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter, got an empty list")
    parts = [_parts(i, ad) for i, ad in enumerate(adapters)]
    in_shape, out_shape = parts[0][0].shape[:-1], parts[0][1].shape[1:]
    for i, (a, b, _) in enumerate(parts):
        if a.shape[:-1] != in_shape or b.shape[1:] != out_shape:
            raise ValueError(
                f"adapters[{i}] maps {a.shape[:-1]} -> {b.shape[1:]}, adapters[0] "
                f"{in_shape} -> {out_shape}: a bank stacks adapters of one projection"
            )
    ranks = [a.shape[-1] for a, _, _ in parts]
    r = max(ranks)
    dtype = jnp.result_type(*[p[0].dtype for p in parts])
    a = jnp.stack([jnp.pad(p[0], [(0, 0)] * (p[0].ndim - 1) + [(0, r - k)]) for p, k in
                   zip(parts, ranks)]).astype(dtype)  # fmt: skip
    b = jnp.stack([jnp.pad(p[1], [(0, r - k)] + [(0, 0)] * (p[1].ndim - 1)) for p, k in
                   zip(parts, ranks)]).astype(dtype)  # fmt: skip
    axes = kernel_axes(linear) if linear is not None else (None, None)
    return LoRABank(a, b, [p[2] for p in parts], ranks, in_axes=axes[0], out_axes=axes[1])


def unstack(bank: LoRABank) -> list[tuple]:
    """The bank's adapters as ``(a [*in, r_i], b [r_i, *out], scale)`` tuples (rank padding
    removed); ``stack_adapters(unstack(bank))`` rebuilds the bank.

    Raises:
      ValueError: ``bank`` is not a ``LoRABank``.
    """
    if not isinstance(bank, LoRABank):
        raise ValueError(f"unstack needs a LoRABank, got {type(bank).__name__}")
    a, b, scale = bank.a[...], bank.b[...], np.asarray(bank.scale[...])
    return [(a[i, ..., :k], b[i, :k], float(scale[i])) for i, k in enumerate(bank.ranks)]


def mix(model, names, *, name: str = "mixed") -> list[str]:
    """Stack the named LoRA adapters of ``model`` (applied with ``lowrank.apply``) into one
    ``LoRABank`` per projection, added as adapter ``name`` and made the only active one: row
    b of a batch then uses ``names[sequence_ids_B[b]]`` (-1: the base). The named adapters stay
    in place (``set_active`` returns to any of them).

    Returns:
      The mixed paths.

    Raises:
      ValueError: fewer than one name, a projection holding only some of ``names`` (listed),
        a name no projection holds, ``name`` already taken, or a DoRA / non-LoRA adapter.
    """
    from jaxattn.lowrank._apply import AdapterSet
    from jaxattn.lowrank._surgery import linear_paths

    names = list(names)
    if not names:
        raise ValueError("mix needs at least one adapter name")
    done, partial = [], []
    for path, linear in linear_paths(model).items():
        s = linear.adapter
        if not isinstance(s, AdapterSet):
            continue
        held = [n for n in names if n in s.adapters]
        if not held:
            continue
        if len(held) != len(names):
            partial.append(f"{path} holds {held}")
            continue
        if name in s.adapters:
            raise ValueError(f"mix: {path!r} already has an adapter named {name!r}")
        if s.merged:
            raise ValueError(f"mix: {path!r} has merged adapters; unmerge first")
        if any(n in s.bias_deltas for n in names):
            raise ValueError(f"mix: {path!r} has adapters with a trained bias (bias='lora_only')")
        s.adapters[name] = stack_adapters([s.adapters[n] for n in names], linear=linear)
        s.active = ((name, 1.0),)
        done.append(path)
    if partial:
        raise ValueError(f"mix: every projection must hold all of {names}; {partial}")
    if not done:
        raise ValueError(f"mix: no projection holds the adapters {names}")
    return done
