"""Adapter methods by name: the one registry every adapter kind of ``jaxattn.lowrank`` joins.

A method is a frozen dataclass (its hyper-parameters: ``rank``, ``alpha``, ...) decorated with
``@register_method("name")``. It builds the adapter of one projection::

    @register_method("lora")
    @dataclasses.dataclass(frozen=True)
    class LoRAConfig(MethodConfig):
        rank: int = 8
        alpha: float = 8.0

        def build(self, path, linear, *, rngs):   # -> an nnx.Module following layers.Adapter
            ...

The adapter it returns is an ``nnx.Module`` with ``delta(x, ctx, *, base)`` and
``delta_kernel(base)`` (``jaxattn.layers.Adapter``), whose trainable parameters are
``jaxattn.layers.AdapterParam`` (fixed buffers, e.g. NOLA's or RandLoRA's random bases
regenerated from a key, are not Params). ``lowrank.apply`` finds the method by name, applies
per-path overrides with ``dataclasses.replace`` and calls ``validate`` then ``build`` on every
selected ``Linear``. The method's fields are what the adapter's JSON config records.

Where the training procedure is part of the method (SoRA's proximal gate step, a rank schedule,
a pruning schedule), the method names it in :meth:`MethodConfig.training_rules`: the optimizer
rules (``train.optim`` syntax) that ``train.finetune`` uses for the method when the run keeps
its default rules. The procedures are optimizer factories registered in
``train/adapter_procedures.py``; a procedure that changes what the forward reads (a rank mask,
a pruning mask) keeps that state in adapter leaves it writes through its updates.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar

from flax import nnx

__all__ = ["MethodConfig", "register_method", "get_method", "registered_methods", "make_method"]


TRAINING_RULES = ("adamw:/adapter/", "frozen:.*")  # MethodConfig.training_rules' default


class MethodConfig:
    """Base of every method's config dataclass (subclasses are frozen dataclasses)."""

    method: ClassVar[str] = ""  # set by register_method

    def validate(self, path: str, linear) -> None:
        """Raise ``ValueError`` (naming the field and ``path``) if this config cannot adapt
        ``linear`` (e.g. a rank above what the method allows for its shape)."""

    def build(self, path: str, linear, *, rngs: nnx.Rngs) -> Any:
        """The adapter module of ``linear`` (at module path ``path``)."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    def training_rules(self) -> tuple[str, ...]:
        """The optimizer rules that train this method (``train.optim`` syntax): by default
        AdamW on the adapter leaves and everything else frozen. A method whose training
        procedure is part of it returns a rule naming its procedure (e.g. SoRA's
        ``"sora(lam=0.1):/adapter/"``), registered in ``train/adapter_procedures.py``."""
        return TRAINING_RULES

    def to_json(self) -> dict:
        """The fields as plain JSON values, plus ``"method"``."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


_METHODS: dict[str, type] = {}


def register_method(name: str):
    """Class decorator: register a method config dataclass under ``name``.

    Raises:
      ValueError: ``name`` is already registered by another class.
    """

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
            raise TypeError(f"register_method({name!r}) needs a MethodConfig subclass, got {cls}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_method({name!r}): {cls.__name__} must be a dataclass")
        old = _METHODS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"adapter method {name!r} is already registered by {old.__name__}")
        cls.method = name
        _METHODS[name] = cls
        return cls

    return deco


def registered_methods() -> list[str]:
    """Every registered method name, sorted."""
    import jaxattn.lowrank.methods  # noqa: F401 - registers the built-in methods

    return sorted(_METHODS)


def get_method(name: str) -> type:
    """The config class registered as ``name``.

    Raises:
      ValueError: unknown method (the registered names and close matches listed).
    """
    names = registered_methods()
    if name not in _METHODS:
        close = difflib.get_close_matches(str(name), names, n=3)
        raise ValueError(
            f"unknown adapter method {name!r}; registered: {names}"
            + (f" (did you mean {close}?)" if close else "")
        )
    return _METHODS[name]


def make_method(name: str, **fields) -> MethodConfig:
    """``get_method(name)(**fields)``, with unknown fields named in the error.

    Raises:
      ValueError: unknown method or field (the method's fields listed).
    """
    cls = get_method(name)
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(fields) - known)
    if bad:
        raise ValueError(
            f"adapter method {name!r} has no field(s) {bad}; its fields: {sorted(known)}"
        )
    return cls(**fields)
