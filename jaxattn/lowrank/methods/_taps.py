"""A gradient tap: a leaf whose cotangent is a statistic of the backward pass (private).

IncreLoRA's and LoRAPrune's importance scores are functions of quantities that exist only in
the backward pass of one projection (its input ``x``, the output cotangent ``dy``, the factor
gradients) and, for LoRAPrune, of the frozen kernel W, whose gradient must never be formed.
:func:`tapped` computes ``fn(extra, *args)`` and defines the cotangent of a ``score`` leaf (an
``AdapterParam`` the forward does not otherwise read) as ``stat(extra, args, arg_cts, dy)``;
the cotangents of ``args`` are the ordinary ones and ``extra`` (the frozen kernel) gets none.
So ``jax.grad`` w.r.t. the adapter leaves alone delivers the statistic as the score's "gradient",
inside the same backward, under ``jit``, with no weight gradient.

The statistic is taken on the gradients of the loss the backward differentiates (in
``train.step`` the token-summed loss, later divided by the token count like every gradient).
"""

from __future__ import annotations

import functools

import jax

__all__ = ["tapped"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def tapped(fn, stat, score, extra, *args):
    """``fn(extra, *args)``; the cotangent of ``score`` is ``stat(extra, args, cts, dy)``."""
    del stat, score
    return fn(extra, *args)


def _fwd(fn, stat, score, extra, *args):
    return fn(extra, *args), (score, extra, args)


def _bwd(fn, stat, res, dy):
    score, extra, args = res
    _, vjp = jax.vjp(lambda *a: fn(jax.lax.stop_gradient(extra), *a), *args)
    cts = vjp(dy)
    s = stat(extra, args, cts, dy)
    return (s.astype(score.dtype).reshape(score.shape), None, *cts)


tapped.defvjp(_fwd, _bwd)
