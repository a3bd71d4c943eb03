"""Field checks shared by the layer and model configs: each names the field and what it wants.

Configs validate in ``__post_init__``, so a bad value fails where it is written, not at the
first call: ``num_heads=4.0``, ``num_heads="4"``, ``dtype="fp16"``, ``norm_eps=-1``,
``logits_soft_cap=0.0`` and unknown implementations are rejected with a one-line message.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp

__all__ = [
    "check_int",
    "check_optional_int",
    "check_float",
    "check_rate",
    "check_dtype",
    "check_implementation",
    "check_cache",
]


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}.{name}={value!r} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}.{name}={value} must be >= {minimum}")
    return int(value)


def check_optional_int(owner: str, name: str, value: Any, minimum: int = 1) -> int | None:
    """None, or an int >= ``minimum``."""
    return None if value is None else check_int(owner, name, value, minimum)


def check_float(
    owner: str, name: str, value: Any, *, positive: bool = True, optional: bool = False
) -> float | None:
    """A real number (> 0 when ``positive``), or None when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}.{name}={value!r} must be a number, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{owner}.{name}={value} must be > 0")
    return float(value)


def check_rate(owner: str, name: str, value: Any) -> float:
    """A probability in [0, 1) (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{owner}.{name}={value!r} must be a number in [0, 1)")
    return float(value)


def check_dtype(owner: str, name: str, value: Any, *, optional: bool = False):
    """A floating dtype (``jnp.bfloat16``, ``"float32"``, ...), or None when ``optional``."""
    if value is None and optional:
        return None
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise ValueError(
            f"{owner}.{name}={value!r} is not a dtype (e.g. jnp.float32, 'bfloat16')"
        ) from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{owner}.{name}={value!r} must be a floating dtype, got {dt}")
    return value


def check_implementation(owner: str, name: str, value: Any) -> str:
    """One of ``jaxattn.ops.IMPLEMENTATIONS``."""
    from jaxattn.ops.attention import IMPLEMENTATIONS

    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{owner}.{name}={value!r} must be one of {IMPLEMENTATIONS}")
    return value


def check_cache(owner: str, cache, *, formats: tuple[str, ...], policies=("full", "sink_window")):
    """Raise ValueError unless ``cache`` is None or a CacheConfig ``owner`` can serve."""
    if cache is None:
        return
    from jaxattn.cache import CacheConfig

    if not isinstance(cache, CacheConfig):
        raise ValueError(
            f"{owner}.cache must be a jaxattn.cache.CacheConfig or None, got {type(cache).__name__}"
        )
    cache.check_served(owner, formats=formats, policies=policies)


def check_head_split(owner: str, num_heads: int, d_model: int, head_dim: int | None) -> None:
    """Raise ValueError unless the head size is given or ``num_heads`` divides ``d_model``
    (the default head size is ``d_model // num_heads``)."""
    if head_dim is None and d_model % num_heads:
        raise ValueError(
            f"{owner}: num_heads={num_heads} must divide d_model={d_model} "
            "when head_dim is not given"
        )
