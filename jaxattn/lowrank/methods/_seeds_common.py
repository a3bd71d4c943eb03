"""Shared pieces of the LoRA-family methods in this folder (private; not a method itself).

Contractions over the multi-dim in/out shapes of a ``Linear`` [*in, *out], the LoRA-style
initialization of a down-projection, and the rank-bound check every method makes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxattn.layers import Linear
from jaxattn.layers._base import dense

__all__ = [
    "down_init",
    "check_rank",
    "check_field",
    "is_int",
    "is_number",
    "contract",
    "outer",
    "fold_key",
]


def down_init(key: jax.Array, in_shape: tuple, rank: int) -> jax.Array:
    """A down-projection [*in, rank] ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in fp32 (the bound of
    PyTorch's kaiming_uniform(a=sqrt(5)) that LoRA's reference code uses for A)."""
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    return jax.random.uniform(key, tuple(in_shape) + (rank,), jnp.float32, -bound, bound)


def check_rank(path: str, linear: Linear, rank: int, limit: int, *, name: str = "rank") -> None:
    """``ValueError`` naming ``name`` and ``path`` unless ``1 <= rank <= limit``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
        raise ValueError(
            f"{name}={rank!r} for {path!r} (in {linear.in_shape}, out {linear.out_shape}) "
            f"must be an int in [1, {limit}]"
        )


def is_int(v) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """An int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_field(where: str, cfg, field: str, ok: bool, want: str) -> None:
    """``ValueError`` "where: field=value must be want" unless ``ok``: the one form of a
    method's hyper-parameter error."""
    if not ok:
        raise ValueError(f"{where}: {field}={getattr(cfg, field)!r} must be {want}")


def contract(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """``x [..., I...] · w [I..., O...]`` over the last ``n`` axes of x, in x's dtype."""
    return dense(x, w.astype(x.dtype), n)


def outer(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [*in, r] · b [r, *out] -> [*in, *out]`` in fp32."""
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), 1)


def fold_key(seed: int, path: str) -> jax.Array:
    """A key for fixed random bases: ``seed`` folded with a stable hash of ``path``."""
    h = 0
    for ch in path.encode():
        h = (h * 131 + ch) % (2**31 - 1)
    return jax.random.fold_in(jax.random.key(seed), h)
