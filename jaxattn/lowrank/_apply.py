"""Applying adapter methods to a model by path, several named adapters per projection.

Each adapted ``Linear`` holds an :class:`AdapterSet` in its adapter slot: named adapters
(``{"default": LoRAAdapter, ...}``) and the active ones with weights. Its output change is the
weighted sum ``Σ_i w_i · delta_i(x)`` of the active, unmerged adapters; ``merge`` folds
``W ← W + Σ_i w_i · delta_kernel_i(W)`` into the kernel and ``unmerge`` inverts it. The
inversion uses the affine form ``delta_kernel_i(W) = W ⊙ c_i + d_i`` (``adapter.affine``,
with the state ``adapter.merge_state(W)`` kept at merge, e.g. DoRA's weight norm):
``W = (W' - Σ w_i d_i) / (1 + Σ w_i c_i)``. An adapter without ``affine`` has its
``delta_kernel(W)`` kept at merge (c = 0, d = that kernel-sized array),
so unmerge is exact for any adapter.

Biases: ``AdapterConfig(bias="lora_only")`` (PEFT's name) also trains the bias of every adapted
projection that has one, as a change ``db`` [*out] (zero at start, fp32, axes of the bias) that
belongs to the named adapter: ``y = x·W + b + Σ_i w_i (delta_i(x) + db_i)``. The base bias
stays intact, so ``disabled`` gives the base exactly (PEFT, which trains the bias in place,
cannot); ``merge`` folds ``Σ w_i db_i`` into the bias, ``save``/``load`` and ``to_peft`` carry it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import AdapterParam
from jaxattn.lowrank._factors import factor, kernel_axes
from jaxattn.lowrank._registry import get_method, make_method
from jaxattn.lowrank._surgery import _select, linear_paths

__all__ = [
    "AdapterConfig",
    "AdapterSet",
    "apply",
    "set_active",
    "disabled",
    "merge",
    "unmerge",
    "remove",
    "trainable_count",
]


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which method adapts which projections (PEFT ``LoraConfig``-like).

    Attributes:
      method: registered method name (``"lora"``, ...).
      options: the method's fields (``{"rank": 8, "alpha": 16.0}``).
      targets: a regex searched in each projection path, a list of them (any matches), or
        ``"all-linear"`` (every projection except ``lm_head``, as PEFT).
      exclude: a regex; matching paths are skipped (None: none).
      overrides: ``{regex: {field: value}}`` per-path field changes (later entries win).
      rank_pattern, alpha_pattern: PEFT's ``{regex: rank}`` / ``{regex: alpha}`` shorthands.
      name: the adapter name on each projection.
      bias: ``"none"`` (biases frozen) or ``"lora_only"`` (the bias of every adapted
        projection that has one trains too, as PEFT's option; see the module docstring).
        PEFT's ``"all"`` (biases of projections the adapter does not target) is refused.
    """

    method: str = "lora"
    options: dict = dataclasses.field(default_factory=dict)
    targets: Any = "all-linear"
    exclude: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    name: str = "default"
    bias: str = "none"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def pattern(self) -> str:
        """The ``targets`` as one regex."""
        t = self.targets
        if t == "all-linear":
            return r"^(?!lm_head$).*"
        if isinstance(t, str):
            return t
        if isinstance(t, (list, tuple)) and t and all(isinstance(p, str) for p in t):
            return "|".join(f"(?:{p})" for p in t)
        raise ValueError(f"targets must be a regex, a list of regexes or 'all-linear', got {t!r}")

    def method_for(self, path: str):
        """The method config of ``path`` with every matching override applied."""
        fields = dict(self.options)
        for pat, v in self.rank_pattern.items():
            if re.search(pat, path):
                fields["rank"] = v
        for pat, v in self.alpha_pattern.items():
            if re.search(pat, path):
                fields["alpha"] = v
        for pat, over in self.overrides.items():
            if re.search(pat, path):
                fields.update(over)
        return make_method(self.method, **fields)


class AdapterSet(nnx.Module):
    """What an adapted ``Linear``'s slot holds: named adapters, the active ones with weights.

    Attributes:
      adapters: ``nnx.Dict`` name -> adapter.
      active: tuple of (name, weight) (static: changing a weight retraces a jitted forward).
      enabled: False inside ``disabled``.
      merged: the (name, weight) pairs folded into the kernel (static; empty when unmerged).
    """

    def __init__(self):
        self.adapters = nnx.Dict()
        self.active = ()
        self.enabled = True
        self.merged = ()
        self.merge_states = nnx.data({})
        self.bias_deltas = nnx.Dict()  # name -> AdapterParam [*out] (bias="lora_only")
        self.records = ()  # (name, AdapterConfig json, method fields json), static

    def record(self, name):
        """(AdapterConfig, method config) that adapter ``name`` was built with."""
        for n, c, m in self.records:
            if n == name:
                c, m = json.loads(c), json.loads(m)
                return AdapterConfig(**c), make_method(m.pop("method"), **m)
        raise KeyError(name)

    def _live(self):
        if not self.enabled or self.merged:
            return []
        return [(n, w) for n, w in self.active]

    def delta(self, x, ctx, *, base):
        out = None
        for n, w in self._live():
            d = self.adapters[n].delta(x, ctx, base=base)
            if n in self.bias_deltas:
                d = d + self.bias_deltas[n][...].astype(d.dtype)
            d = d if w == 1.0 else d * jnp.asarray(w, d.dtype)
            out = d if out is None else out + d
        return out  # None with no live adapter: the base's own program

    def delta_bias(self, pairs=None):
        """``Σ w_i db_i`` [*out] over the live (or given) adapters with a bias change, fp32;
        None when there is none."""
        out = None
        for n, w in self._live() if pairs is None else pairs:
            if n in self.bias_deltas:
                d = w * self.bias_deltas[n][...].astype(jnp.float32)
                out = d if out is None else out + d
        return out

    def delta_kernel(self, base):
        out = jnp.zeros_like(base)
        for n, w in self._live():
            ad = self.adapters[n]
            out = out + (w * ad.delta_kernel(base).astype(jnp.float32)).astype(base.dtype)
        return out

    def _affine(self, pairs, states):
        c = jnp.zeros((), jnp.float32)
        d = 0.0
        for n, w in pairs:
            ad = self.adapters[n]
            if hasattr(ad, "affine"):
                ci, di = ad.affine(states[n])
            else:
                ci, di = jnp.zeros((), jnp.float32), states[n]
            c = c + w * ci
            d = d + w * di
        return c, d


def _sets(model) -> dict[str, AdapterSet]:
    return {
        p: m.adapter for p, m in linear_paths(model).items() if isinstance(m.adapter, AdapterSet)
    }


def apply(model: nnx.Module, config: AdapterConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Attach ``config.name`` (method ``config.method``) to every selected projection.

    The new adapter is made active (alone, weight 1) on its projections. A method with
    ``init_base`` (PiSSA / OLoRA) rewrites the base kernel.

    Returns:
      The adapted paths, in model order.

    Raises:
      ValueError: unknown method or field, targets matching nothing (close matches listed),
        an invalid per-path config (e.g. rank <= 0, named with the path), a projection that
        already has an adapter named ``config.name``, or a merged projection.
    """
    get_method(config.method)
    if config.bias not in BIAS_MODES:
        hint = " (PEFT's 'all' trains biases outside the targets: not supported)" * (
            config.bias == "all"
        )
        raise ValueError(f"bias={config.bias!r} must be one of {BIAS_MODES}{hint}")
    chosen = _select(model, config.pattern())
    if config.exclude:
        chosen = {p: m for p, m in chosen.items() if not re.search(config.exclude, p)}
        if not chosen:
            raise ValueError(f"exclude={config.exclude!r} removes every target {config.targets!r}")
    plan = {}
    for path, linear in chosen.items():
        s = linear.adapter
        if s is not None and not isinstance(s, AdapterSet):
            raise ValueError(f"{path!r} holds a non-AdapterSet adapter {type(s).__name__}")
        if isinstance(s, AdapterSet):
            if config.name in s.adapters:
                raise ValueError(f"{path!r} already has an adapter named {config.name!r}")
            if s.merged:
                raise ValueError(f"{path!r} has merged adapters; unmerge before applying")
        cfg = config.method_for(path)
        cfg.validate(path, linear)
        plan[path] = cfg
    for path, cfg in plan.items():
        linear = chosen[path]
        ad = cfg.build(path, linear, rngs=rngs)
        hook = getattr(cfg, "init_base", None)
        new = hook(path, linear, ad) if hook is not None else None
        if new is not None:
            _write_kernel(linear, new, path)
        if linear.adapter is None:
            linear.adapter = AdapterSet()
        linear.adapter.adapters[config.name] = ad
        if config.bias == "lora_only" and linear.bias is not None:
            _, out_ax = kernel_axes(linear)
            linear.adapter.bias_deltas[config.name] = factor(jnp.zeros(linear.out_shape), out_ax)
        linear.adapter.active = ((config.name, 1.0),)
        linear.adapter.records = linear.adapter.records + (
            (config.name, json.dumps(config.to_json()), json.dumps(cfg.to_json())),
        )
    return list(plan)


BIAS_MODES = ("none", "lora_only")


def _add_bias(linear, change, sign):
    if change is not None:
        b = linear.bias[...]
        linear.bias[...] = (b.astype(jnp.float32) + sign * change).astype(b.dtype)


def _write_kernel(linear, w, path):
    if linear.form is not None:  # a factorised kernel (optim.parameterize) has no W to write
        raise ValueError(
            f"{path!r} holds a factorised {type(linear.form).__name__} kernel: merging or a "
            "base-rewriting init would need a dense W (adapters run unmerged on it)"
        )
    if linear.transposed:
        raise ValueError(
            f"{path!r} is a tied (transposed) head: changing its kernel would change the "
            "embedding too; untie it or use an adapter that keeps the base"
        )
    linear.kernel[...] = w.reshape(linear.kernel.shape).astype(linear.kernel.dtype)


def set_active(model: nnx.Module, names) -> None:
    """Activate ``names`` (a name, a list of names, or ``{name: weight}``) on every
    projection holding all of them; the output change becomes ``Σ w_i delta_i``.

    Raises:
      ValueError: a name no projection holds, or merged adapters (unmerge first).
    """
    if isinstance(names, str):
        names = {names: 1.0}
    elif not isinstance(names, dict):
        names = {n: 1.0 for n in names}
    pairs = tuple((str(n), float(w)) for n, w in names.items())
    sets = _sets(model)
    known = {n for s in sets.values() for n in s.adapters}
    bad = sorted({n for n, _ in pairs} - known)
    if bad:
        raise ValueError(f"set_active: no adapter named {bad}; present: {sorted(known)}")
    for path, s in sets.items():
        if s.merged:
            raise ValueError(f"set_active: {path!r} has merged adapters; unmerge first")
        s.active = tuple((n, w) for n, w in pairs if n in s.adapters)


@contextlib.contextmanager
def disabled(model: nnx.Module):
    """Within the block the model runs as its base (every adapter off).

    Raises:
      ValueError: merged adapters (unmerge first).
    """
    sets = _sets(model)
    if any(s.merged for s in sets.values()):
        raise ValueError("disabled: the model has merged adapters; unmerge first")
    old = {p: s.enabled for p, s in sets.items()}
    for s in sets.values():
        s.enabled = False
    try:
        yield model
    finally:
        for p, s in sets.items():
            s.enabled = old[p]


def merge(model: nnx.Module) -> list[str]:
    """Fold the active adapters into each kernel: ``W ← W + Σ w_i delta_kernel_i(W)`` (fp32).

    Returns the merged paths. Raises ValueError on a tied head or an already merged one.
    """
    done = []
    for path, linear in linear_paths(model).items():
        s = linear.adapter
        if not isinstance(s, AdapterSet) or not s.active or not s.enabled:
            continue
        if s.merged:
            raise ValueError(f"merge: {path!r} is already merged")
        if linear.transposed:
            raise ValueError(f"merge: {path!r} is a tied head (would change the embedding)")
        if linear.form is not None:
            raise ValueError(
                f"merge: {path!r} holds a factorised {type(linear.form).__name__} kernel; "
                "an adapter on it runs unmerged"
            )
        w = linear.base_kernel(jnp.float32)
        states = {}
        for n, _ in s.active:
            ad = s.adapters[n]
            states[n] = ad.merge_state(w) if hasattr(ad, "affine") else ad.delta_kernel(w)
        c, d = s._affine(s.active, states)
        _write_kernel(linear, w * (1 + c) + d, path)
        _add_bias(linear, s.delta_bias(s.active), 1.0)
        s.merge_states = nnx.data(states)
        s.merged = s.active
        done.append(path)
    return done


def unmerge(model: nnx.Module) -> list[str]:
    """Undo ``merge``: ``W = (W' - Σ w_i d_i) / (1 + Σ w_i c_i)``; returns the paths."""
    done = []
    for path, linear in linear_paths(model).items():
        s = linear.adapter
        if not isinstance(s, AdapterSet) or not s.merged:
            continue
        c, d = s._affine(s.merged, s.merge_states)
        w = linear.base_kernel(jnp.float32)
        _write_kernel(linear, (w - d) / (1 + c), path)
        _add_bias(linear, s.delta_bias(s.merged), -1.0)
        s.merged = ()
        s.merge_states = nnx.data({})
        done.append(path)
    return done


def remove(model: nnx.Module, name: str) -> list[str]:
    """Delete adapter ``name`` everywhere (an emptied slot becomes None); returns the paths.

    Raises:
      ValueError: no projection holds ``name``, or it is merged there (unmerge first).
    """
    held = holding(model, name, op="remove")
    for linear in held.values():
        s = linear.adapter
        del s.adapters[name]
        if name in s.bias_deltas:
            del s.bias_deltas[name]
        s.active = tuple((n, w) for n, w in s.active if n != name)
        s.records = tuple(r for r in s.records if r[0] != name)
        if not len(s.adapters):
            linear.adapter = None
    return list(held)


def holding(model: nnx.Module, name: str, *, op: str) -> dict:
    """The projections (path -> ``Linear``) whose ``AdapterSet`` holds adapter ``name``.

    Raises:
      ValueError (prefixed ``op``): no projection holds ``name``, or it is merged into one
        (unmerge first).
    """
    held = {}
    for path, linear in linear_paths(model).items():
        s = linear.adapter
        if not isinstance(s, AdapterSet) or name not in s.adapters:
            continue
        if any(n == name for n, _ in s.merged):
            raise ValueError(f"{op}: {name!r} is merged into {path!r}; unmerge first")
        held[path] = linear
    if not held:
        raise ValueError(f"{op}: no projection holds an adapter named {name!r}")
    return held


def trainable_count(model: nnx.Module) -> int:
    """The number of adapter parameters (every ``AdapterParam`` element)."""
    leaves = jax.tree.leaves(nnx.state(model, AdapterParam))
    return int(sum(x.size for x in leaves))
