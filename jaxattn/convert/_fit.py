"""The training loop the conversions that fine-tune their factors share (CSKV, PELA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def adam_fit(loss, params, *, lr: float, steps: int):
    """``steps`` Adam steps on ``loss(params)`` in one compiled scan.

    Returns the final params and the loss before every step plus the final one
    (``steps + 1`` values)."""
    opt = optax.adam(lr)

    @jax.jit
    def run(p):
        def step(carry, _):
            p, st = carry
            val, g = jax.value_and_grad(loss)(p)
            upd, st = opt.update(g, st, p)
            return (optax.apply_updates(p, upd), st), val

        (p, _), hist = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return p, jnp.append(hist, loss(p))

    return run(params)
