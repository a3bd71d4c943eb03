"""GradNormLoRP: low-rank projected gradients on a weight-normalised reparameterisation.

"Gradient Weight-normalized Low-rank Projection for Efficient LLM Training" (GradNormLoRP).
A kernel ``W`` of shape ``[*in, *out]`` is reparameterised as (Salimans & Kingma's weight
normalisation, one scale per output unit)::

    W = g ⊙ V / ‖V‖        ‖V‖ and g: [*out], the norm over the fan-in dims

and trained as the pair ``{"g": g, "v": V}``. The optimizer projects the gradient of every
``V`` to low rank exactly as GaLore does (``V`` is a matrix) and runs the inner transform on
``g`` (a vector) in full; the 8-bit variant stores the inner state in 8 bits (``moment_bits=8``).
The merged kernel is a plain dense weight: same output and cost as the layer it came from.
† The paper also applies low-rank structure to the weight itself; this module implements the
reparameterisation and the projected-gradient optimizer (the part PAPERS.md's tests name).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxattn.optim._plan import FanIn, Rank
from jaxattn.optim.galore import _projected

__all__ = ["weight_norm_split", "weight_norm_merge", "gradnormlorp"]


def _norm(v: jax.Array, fan_in_axes: int) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=tuple(range(fan_in_axes))))


def weight_norm_split(kernel: jax.Array, *, fan_in_axes: int = 1) -> dict[str, jax.Array]:
    """``{"g": ‖W‖ [*out], "v": W}``: the weight-normalised pair that reproduces ``kernel``."""
    if not 1 <= fan_in_axes < kernel.ndim:
        raise ValueError(
            f"fan_in_axes={fan_in_axes} must be in [1, {kernel.ndim - 1}] for {kernel.shape=}"
        )
    return {"g": _norm(kernel, fan_in_axes).astype(kernel.dtype), "v": kernel}


def weight_norm_merge(g: jax.Array, v: jax.Array, *, fan_in_axes: int = 1) -> jax.Array:
    """The kernel ``g ⊙ V / ‖V‖`` (shape of ``v``); a zero column of ``V`` gives a zero column
    (not NaN). Differentiable: use it inside the forward pass."""
    if g.shape != v.shape[fan_in_axes:]:
        raise ValueError(f"{g.shape=} must be v.shape[{fan_in_axes}:] = {v.shape[fan_in_axes:]}")
    norm = _norm(v, fan_in_axes)
    return (v * (g / jnp.where(norm > 0, norm, 1.0)).astype(v.dtype)).astype(v.dtype)


def gradnormlorp(
    inner: optax.GradientTransformation,
    *,
    rank: Rank,
    update_proj_gap: int,
    scale: float = 1.0,
    v_name: str = "v",
    proj_type: str = "std",
    projector="svd",
    fan_in_axes: FanIn = 1,
    moment_bits: int = 32,
) -> optax.GradientTransformation:
    """GaLore on the ``V`` leaves of weight-normalised pairs; ``g`` and every other leaf go to
    ``inner`` unprojected. ``V`` leaves are those whose path ends in ``/{v_name}`` (the
    :func:`weight_norm_split` layout). Arguments as :func:`jaxattn.optim.galore`.

    Raises:
      ValueError: as :func:`galore`; no leaf named ``v_name`` (``rank`` selects nothing).
    """
    return _projected(
        inner, _VRank(rank, v_name), update_proj_gap, scale, proj_type, projector, fan_in_axes,
        None, moment_bits, None, gamma=None, who="gradnormlorp",
    )  # fmt: skip


class _VRank:
    """``rank`` restricted to leaves named ``v_name``."""

    def __init__(self, rank, v_name):
        self.rank, self.v_name = rank, v_name

    def __call__(self, path: str, shape):
        if path.rsplit("/", 1)[-1] != self.v_name:
            return None
        return self.rank(path, shape) if callable(self.rank) else self.rank

    def __repr__(self):
        return f"{self.rank!r} on the leaves named {self.v_name!r}"
