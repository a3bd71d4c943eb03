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
``train.step`` the token-summed loss, later divided by the token count like every gradient),
per backward pass: with gradient accumulation the score's cotangent is the sum of the
microbatches' statistics (not the statistic of the summed gradient), and it is scaled by
global-norm clipping like every gradient when clipping engages.
"""

from __future__ import annotations

import functools

import jax

__all__ = ["tapped", "TAP_SCALE", "leaf_path", "modules_with"]


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


# The score cotangent is emitted times TAP_SCALE so that it adds nothing measurable to the
# global gradient norm (clipping, the grad_norm metric); the procedures divide it back out.
TAP_SCALE = 2.0**-40


def leaf_path(path) -> str:
    """The ``/``-joined names of a pytree key path (an nnx Variable's own field dropped)."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
    while names and names[-1] in ("value", "raw_value"):
        names.pop()
    return "/".join(names)


def modules_with(tree, leaf: str) -> dict[str, dict[str, int]]:
    """``{prefix: {name: flat index}}`` of the adapters in ``tree`` (a params/updates pytree)
    holding a leaf named ``leaf`` directly under ``.../adapter/`` or
    ``.../adapter/adapters/NAME/``: every leaf of that adapter by its last name."""
    import re

    flat = jax.tree_util.tree_leaves_with_path(tree)
    paths = [leaf_path(p) for p, _ in flat]
    pat = re.compile(rf"^(.*(?:^|/)adapter/(?:adapters/[^/]+/)?){re.escape(leaf)}$")
    out: dict[str, dict[str, int]] = {}
    for p in paths:
        m = pat.match(p)
        if m:
            out[m.group(1)] = {}
    for i, p in enumerate(paths):
        for prefix in out:
            rest = p[len(prefix) :] if p.startswith(prefix) else None
            if rest and "/" not in rest:
                out[prefix][rest] = i
    return out
