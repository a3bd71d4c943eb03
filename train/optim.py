"""Optimizers by path (Extension point 7): ordered rules over named optax factories.

``TrainConfig.optimizer`` is an ordered tuple of rules ``"name(key=value, ...):regex"``
(``"frozen:^embed/"``, ``"galore(rank=64):/attn/"``, ``"adamw:.*"``). Each parameter takes
the first rule whose regex is found (``re.search``) in its path, the ``/``-joined keys of the
model's ``nnx.to_pure_dict`` parameters (``"layers/0/attn/q/kernel"``). ``name`` picks a
factory from the registry (:func:`register_optimizer`; built in: see :mod:`train.optimizers`)
and the arguments, Python literals, go to it. A factory receives the parameters its rule
took, each as a :class:`ParamInfo` (path, shape, logical axes, fan-in), and the train config
(learning-rate schedule, betas, weight decay), and returns an ``optax.GradientTransformation``
over exactly those parameters.

Frozen parameters (a factory registered with ``trains=False``, such as ``frozen``) are not
handed to the optimizer at all: the train step differentiates only the trainable ones
(:func:`split_params`), so frozen weights cost no weight-gradient compute, no gradient
norm and no optimizer state. Global-norm clipping (``clip_norm``) runs over all trainable
gradients before the rules' transforms.

Bad rules raise :class:`train.config.ConfigError` naming the ``optimizer`` field: a rule that
does not parse, an unknown factory (the registered names, with close matches), factory
arguments the factory does not take, a regex matching no parameter (close paths listed) or
only parameters earlier rules took (a catch-all matching every parameter may take none), a
parameter no rule takes, or no trainable parameter.

A parameterisation whose leaves need a particular rule (SST's spectral kernels need ``sst``)
registers a check (:func:`register_rule_check`) that sees which rule trains each parameter
and warns when a needed rule is missing.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Callable

import jax
import optax

__all__ = [
    "ParamInfo",
    "OptimizerRule",
    "path_string",
    "parse_rule",
    "register_optimizer",
    "registered_optimizers",
    "register_rule_check",
    "param_infos",
    "assign_rules",
    "split_params",
    "merge_params",
    "lr_schedule",
    "make_optimizer",
]


def path_string(path) -> str:
    """``"a/b/0/c"`` for a pytree key path or an NNX path tuple."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        parts.append(str(key))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What a factory knows of one parameter.

    Attributes:
      path: ``"layers/0/attn/q/kernel"``.
      shape: the parameter's shape.
      axes: its logical axis names (None where unannotated), one per dim.
      fan_in_axes: how many leading dims are inputs (``Linear`` records it on its kernel;
        otherwise 1 for a leaf with >= 2 dims, 0 for a vector or scalar).
      kind: the NNX variable type (``nnx.Param``, ``jaxattn.layers.AdapterParam``, ...).
    """

    path: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    fan_in_axes: int
    kind: type = object

    @property
    def fan_in(self) -> int:
        """Product of the input dims (1 for a vector or scalar)."""
        return math.prod(self.shape[: self.fan_in_axes])

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class OptimizerRule:
    """One parsed rule: factory ``name``, its keyword ``kwargs``, the path ``pattern``."""

    text: str
    name: str
    kwargs: dict
    pattern: str


@dataclasses.dataclass(frozen=True)
class _Factory:
    fn: Callable
    trains: bool


_REGISTRY: dict[str, _Factory] = {}


def register_optimizer(name: str, fn: Callable, *, trains: bool = True) -> None:
    """Register ``fn(params: dict[str, ParamInfo], config, **kwargs) -> GradientTransformation``
    under ``name`` for optimizer rules. ``trains=False`` marks a factory whose parameters do
    not train (they get no gradient and no state; ``fn`` is then never called)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"optimizer name {name!r} must be an identifier")
    _REGISTRY[name] = _Factory(fn, trains)


_CHECKS: list[Callable] = []


def register_rule_check(fn: Callable) -> None:
    """Register ``fn(trained: dict[str, str]) -> None``, called by :func:`make_optimizer` with
    the name of the rule that trains each trainable parameter (by path); it may warn, or raise
    ``ValueError`` (reported as a ``ConfigError``)."""
    _CHECKS.append(fn)


def registered_optimizers() -> list[str]:
    """The factory names optimizer rules accept."""
    import train.optimizers  # noqa: F401 - registers the built-in factories

    return sorted(_REGISTRY)


def _error(message: str):
    from train.config import ConfigError  # a ValueError naming the config field

    return ConfigError(message)


def parse_rule(text: str) -> OptimizerRule:
    """Parse ``"name:regex"`` or ``"name(key=literal, ...):regex"`` (syntax only).

    Raises:
      ConfigError: a malformed rule, non-literal or positional arguments, or a bad regex.
    """
    head = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*", text)
    where = f"optimizer rule {text!r}"
    if not head:
        raise _error(f"{where} must look like name:regex or name(key=value,...):regex")
    name, rest, kwargs = head.group(1), text[head.end() :], {}
    if rest.startswith("("):
        depth, end = 0, None
        for i, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                end = i
                break
        if end is None:
            raise _error(f"{where}: unbalanced parentheses in the arguments")
        try:
            call = ast.parse(f"f{rest[: end + 1]}", mode="eval").body
            if call.args:
                raise ValueError("arguments must be key=value")
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError) as err:
            raise _error(f"{where}: arguments are not key=literal pairs ({err})") from None
        rest = rest[end + 1 :]
    if not rest.startswith(":"):
        raise _error(f"{where} must look like name:regex or name(key=value,...):regex")
    pattern = rest[1:]
    try:
        re.compile(pattern)
    except re.error as err:
        raise _error(f"{where}: {pattern!r} is not a regex: {err}") from None
    return OptimizerRule(text, name, kwargs, pattern)


def _factory(rule: OptimizerRule) -> _Factory:
    names = registered_optimizers()
    if rule.name not in _REGISTRY:
        close = difflib.get_close_matches(rule.name, names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise _error(
            f"optimizer rule {rule.text!r}: no optimizer named {rule.name!r}{hint} "
            f"(registered: {', '.join(names)}; train.optim.register_optimizer adds one)"
        )
    factory = _REGISTRY[rule.name]
    params = inspect.signature(factory.fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = [k for k in list(params)[2:]]
        unknown = sorted(set(rule.kwargs) - set(known))
        if unknown:
            raise _error(
                f"optimizer rule {rule.text!r}: {rule.name} takes no argument {unknown} "
                f"(it takes {known})"
            )
    return factory


def param_infos(abstract_params) -> dict[str, ParamInfo]:
    """:class:`ParamInfo` of every parameter of an NNX ``nnx.State`` of ``nnx.Param``s
    (abstract or concrete), by path, in tree order."""
    from flax import nnx

    infos = {}
    for path, var in nnx.to_flat_state(abstract_params):
        meta = var.get_metadata()
        shape = tuple(var.get_value().shape)
        axes = tuple(meta.get("out_sharding") or (None,) * len(shape))
        fan_in_axes = meta.get("fan_in_axes", 1 if len(shape) >= 2 else 0)
        key = path_string(path)
        infos[key] = ParamInfo(key, shape, axes, int(fan_in_axes), type(var))
    return infos


def assign_rules(rules, paths) -> dict[str, OptimizerRule]:
    """The rule each path takes (the first whose regex is found in it).

    Raises:
      ConfigError: see the module docstring.
    """
    parsed = [parse_rule(r) if isinstance(r, str) else r for r in rules]
    if not parsed:
        raise _error('optimizer=() has no rule; e.g. optimizer=("adamw:.*",)')
    for rule in parsed:
        _factory(rule)
    paths = list(paths)
    taken = {}
    for path in paths:
        for rule in parsed:
            if re.search(rule.pattern, path):
                taken[path] = rule
                break
    for i, rule in enumerate(parsed):
        hits = [p for p in paths if re.search(rule.pattern, p)]
        if not hits:
            close = difflib.get_close_matches(rule.pattern, paths, n=5, cutoff=0.3)
            raise _error(
                f"optimizer rule {i} {rule.text!r} matches no parameter; close matches: "
                f"{close}; paths look like {paths[:4]}"
            )
        # a rule shadowed by earlier ones is a mistake, unless it is a catch-all
        if not any(taken.get(p) is rule for p in hits) and len(hits) < len(paths):
            raise _error(
                f"optimizer rule {i} {rule.text!r} matches only parameters that earlier rules "
                f"take (e.g. {hits[0]!r} takes {taken[hits[0]].text!r}); reorder or drop it"
            )
    missing = [p for p in paths if p not in taken]
    if missing:
        raise _error(
            f"optimizer={tuple(r.text for r in parsed)}: no rule takes {len(missing)} "
            f"parameters ({missing[:5]}); end the rules with a catch-all such as 'adamw:.*'"
        )
    if not any(_REGISTRY[r.name].trains for r in taken.values()):
        raise _error(
            f"optimizer={tuple(r.text for r in parsed)} trains no parameter (every "
            "parameter is frozen)"
        )
    return taken


def _select(tree, keep: Callable[[str], bool], prefix: str = ""):
    if not isinstance(tree, dict):
        return tree if keep(prefix[:-1]) else None
    out = {}
    for key, value in tree.items():
        sub = _select(value, keep, f"{prefix}{key}/")
        if sub is not None and not (isinstance(sub, dict) and not sub):
            out[key] = sub
    return out


def split_params(params: dict, trainable) -> tuple[dict, dict]:
    """``(trainable, frozen)`` pure dicts: the leaves of ``params`` whose path is in / not in
    the set ``trainable`` (emptied branches dropped)."""
    return (
        _select(params, lambda p: p in trainable) or {},
        _select(params, lambda p: p not in trainable) or {},
    )


def merge_params(a: dict, b: dict) -> dict:
    """The union of two pure dicts with disjoint leaves (inverse of :func:`split_params`)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_params(out[key], value) if key in out else value
    return out


def lr_schedule(config, lr: float | None = None) -> optax.Schedule:
    """Linear warmup to ``lr`` (default ``config.lr``) over ``warmup_steps``, cosine decay to
    ``lr * min_lr_ratio`` at ``steps``."""
    peak = config.lr if lr is None else lr
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=peak * config.min_lr_ratio,
    )


def make_optimizer(config, infos: dict[str, ParamInfo]):
    """The optimizer of the trainable parameters under ``config.optimizer``.

    Args:
      config: a :class:`train.config.TrainConfig`.
      infos: every parameter's :class:`ParamInfo` by path (:func:`param_infos`).

    Returns:
      ``(tx, trainable)``: an ``optax.GradientTransformation`` over the trainable
      parameters' pure dict (clipping, then each rule's transform on its parameters), and
      the set of trainable paths.

    Raises:
      ConfigError: bad rules (module docstring), or a factory refusing its arguments.
    """
    taken = assign_rules(config.optimizer, infos)
    trainable = {p for p, r in taken.items() if _REGISTRY[r.name].trains}
    for check in _CHECKS:
        try:
            check({p: taken[p].name for p in trainable})
        except ValueError as err:
            raise _error(f"optimizer={tuple(config.optimizer)}: {err}") from None
    rules = list(dict.fromkeys(r for r in taken.values() if _REGISTRY[r.name].trains))
    labels = {r: f"rule{i}_{r.name}" for i, r in enumerate(rules)}
    txs = {}
    for rule in rules:
        mine = {p: infos[p] for p in infos if taken[p] is rule}
        try:
            txs[labels[rule]] = _REGISTRY[rule.name].fn(mine, config, **rule.kwargs)
        except (TypeError, ValueError) as err:
            if type(err).__name__ == "ConfigError":
                raise
            raise _error(f"optimizer rule {rule.text!r}: {err}") from None
    clip = optax.clip_by_global_norm(config.clip_norm)
    if len(txs) == 1:
        return optax.chain(clip, *txs.values()), trainable

    def label_tree(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: labels[taken[path_string(path)]], params
        )

    return optax.chain(clip, optax.multi_transform(txs, label_tree)), trainable
