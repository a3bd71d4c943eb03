"""Auxiliary losses sown by layers during a forward (load-balance losses of routed layers).

A layer calls :func:`sow_aux_loss` with a scalar; whoever runs the model (the train step)
calls :func:`pop_aux_loss` right after the forward and adds the returned sum, times its own
weight, to the objective (``train.step``: ``TrainConfig.aux_loss_weight``, reported as the
metric ``aux_loss``). The values live on the module as :class:`AuxLoss` variables
(``nnx.Intermediate``), so a model that sows nothing carries nothing and costs nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["AuxLoss", "sow_aux_loss", "pop_aux_loss"]


class AuxLoss(nnx.Intermediate):
    """Scalar auxiliary losses sown on a module (a tuple: one entry per forward)."""


def sow_aux_loss(module: nnx.Module, value: jax.Array, name: str = "aux_loss") -> None:
    """Append the scalar ``value`` to ``module``'s :class:`AuxLoss` ``name``."""
    value = jnp.asarray(value, jnp.float32)
    if value.shape != ():
        raise ValueError(f"sow_aux_loss({name!r}): value must be a scalar, got {value.shape}")
    var = getattr(module, name, None)
    if isinstance(var, AuxLoss):
        var.set_value(var.get_value() + (value,))
    else:
        setattr(module, name, AuxLoss((value,)))


def pop_aux_loss(model: nnx.Module) -> jax.Array | None:
    """Remove every :class:`AuxLoss` from ``model`` and return their fp32 sum (None if none:
    the caller then adds nothing, so a model without auxiliary losses trains unchanged)."""
    state = nnx.pop(model, AuxLoss)
    values = [v for _, var in nnx.to_flat_state(state) for v in var.get_value()]
    return sum(values[1:], values[0]) if values else None
