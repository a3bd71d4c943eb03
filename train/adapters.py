"""Adapters in the training scripts: ``--adapter METHOD`` and ``--set adapter.FIELD=VALUE``.

``python -m train.finetune --config finetune_lora --adapter lora --set adapter.rank=8
--set "adapter.targets=attn/(q|k|v|o)$|mlp/"`` attaches a ``jaxattn.lowrank`` adapter of the
registered method to the projections ``targets`` selects (default ``all-linear``) before
training. ``TrainConfig.adapter`` holds the method and ``TrainConfig.adapter_options`` the
``FIELD=VALUE`` strings; ``targets``, ``exclude``, ``name`` and ``bias`` go to the
``lowrank.AdapterConfig``, every other field to the method (typed by the method's dataclass).
With the default optimizer rules an adapter run trains the adapter leaves only
(``adamw:/adapter/``, ``frozen:.*``); given rules are used as they are.

The adapter is part of the run's config, so a fine-tuning checkpoint (its trainable leaves and
a reference to the base) is rebuilt with it on resume and by ``train.sample``; at the end the
adapter is also written alone with ``lowrank.save`` to ``<run_dir>/adapter`` (safetensors +
JSON), which ``train.sample --adapter DIR`` and ``lowrank.load`` read.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from flax import nnx

from jaxattn.lowrank._registry import TRAINING_RULES as ADAPTER_RULES
from train.config import ConfigError, _parse_value

__all__ = ["ADAPTER_RULES", "adapter_config", "attach_adapter", "adapter_rules"]
_CONFIG_KEYS = ("targets", "exclude", "name", "bias")


def _field_kind(kind, default):
    """The scalar type of a method field (``int | None`` -> int; else its default's type)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next((k for k in typing.get_args(kind) if k is not type(None)), str)
    return kind if kind in (bool, int, float, str) else type(default)


def adapter_config(config):
    """The ``lowrank.AdapterConfig`` of a ``TrainConfig`` (None when ``adapter`` is empty).

    Raises:
      ConfigError: an unknown method or field (the method's fields listed), a malformed or
        repeated option, or a value of the wrong type, naming the option.
    """
    if not config.adapter:
        if config.adapter_options:
            raise ConfigError(
                f"adapter options {list(config.adapter_options)} given without --adapter METHOD"
            )
        return None
    from jaxattn import lowrank

    try:
        cls = lowrank.get_method(config.adapter)
    except ValueError as err:
        raise ConfigError(f"adapter: {err}") from None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    options, top = {}, {}
    for item in config.adapter_options:
        if "=" not in item:
            raise ConfigError(f"adapter option {item!r} must look like FIELD=VALUE")
        key, text = (s.strip() for s in item.split("=", 1))
        if key in options or key in top:
            raise ConfigError(f"adapter option {key!r} is given twice")
        if key in _CONFIG_KEYS:
            top[key] = text
        elif key in fields:
            default = fields[key].default
            kind = _field_kind(hints.get(key), default)
            options[key] = _parse_value(f"adapter.{key}", text, kind)
        else:
            known = sorted(set(fields) | set(_CONFIG_KEYS))
            raise ConfigError(f"adapter {config.adapter!r} has no option {key!r}; known: {known}")
    return lowrank.AdapterConfig(method=config.adapter, options=options, **top)


def attach_adapter(model: nnx.Module, config) -> list[str]:
    """Attach the adapter of ``config`` (a ``TrainConfig``) to ``model``; returns the paths.

    The adapter's random initialisation derives from ``config.seed``, so the same config
    rebuilds the same fresh adapter. Methods initialised from the trained base (PiSSA, OLoRA,
    LoRA-SB, LoKU) are initialised again once it is loaded (``train.finetune.start_params``).

    Raises:
      ConfigError: see :func:`adapter_config`; targets matching nothing or a bad field value.
    """
    cfg = adapter_config(config)
    if cfg is None:
        return []
    from jaxattn import lowrank

    try:
        return lowrank.apply(model, cfg, rngs=nnx.Rngs(config.seed + 7919))
    except ValueError as err:
        raise ConfigError(f"adapter {config.adapter!r}: {err}") from None


def adapter_rules(config) -> tuple[str, ...]:
    """The optimizer rules of an adapter run: the given ones, or, when the config keeps the
    default (train every parameter) rules, the method's own ``training_rules()`` (AdamW on the
    adapter leaves, the rest frozen: :data:`ADAPTER_RULES`; SoRA adds its proximal step).

    Raises:
      ConfigError: see :func:`adapter_config`; a method field value the method refuses.
    """
    from jaxattn import lowrank
    from train.config import TrainConfig

    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "optimizer")
    if config.optimizer != default:
        return config.optimizer
    cfg = adapter_config(config)
    try:
        method = lowrank.make_method(cfg.method, **cfg.options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter {config.adapter!r}: {err}") from None
    return tuple(method.training_rules())
