"""Weight refactorisation + momentum reset for low-rank (W = BA) pretraining.

Glentis et al., "Scalable Parameter and Memory Efficient Pretraining for LLM: Recent
Algorithmic Advances and Benchmarking" (2025). A low-rank weight is trained as two factors
``W_mn = B_mr A_rn``. Every ``every`` steps, after the ordinary update:

* **refactorisation** re-balances each pair without changing its product: with thin QRs
  ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` and the SVD ``R_B R_Aᵀ = U S Vᵀ`` (r x r, so ``BA`` is never
  formed), ``B' = Q_B U S^½`` and ``A' = S^½ Vᵀ Q_Aᵀ``; then ``B'A' = BA`` (to fp32 rounding)
  and ``B'ᵀB' = A'A'ᵀ = S`` (both factors carry the same spectrum);
* **momentum reset** restarts the inner optimizer: its state becomes ``inner.init`` of the new
  weights (zero moments, zero step count), as the authors' code re-creates its AdamW; only a
  learning-rate schedule's own count (``optax.ScaleByScheduleState``) carries on, so the
  schedule does not restart its warmup.

† The exact refactorisation (balanced SVD factors) follows the method's description; the paper
text was not available to check the choice of ``S^½`` on both sides.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxattn.optim._plan import flatten, is_masked
from jaxattn.optim.projectors import sign_convention

__all__ = ["balance_factors", "RefactorState", "lowrank_refactor"]


def balance_factors(b_mr: jax.Array, a_rn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(B', A')`` with ``B'A' = BA`` and ``B'ᵀB' = A'A'ᵀ = diag(s)`` (module docstring).

    Deterministic: the columns of ``U`` follow the sign convention of ``projectors`` (and the
    rows of ``Vᵀ`` flip with them).
    """
    if b_mr.ndim != 2 or a_rn.ndim != 2 or b_mr.shape[1] != a_rn.shape[0]:
        raise ValueError(f"factors must be B [m, r] and A [r, n]; got {b_mr.shape=}, {a_rn.shape=}")
    b32, a32 = b_mr.astype(jnp.float32), a_rn.astype(jnp.float32)
    q_b, r_b = jnp.linalg.qr(b32)
    q_a, r_a = jnp.linalg.qr(a32.T)
    u, s, vh = jnp.linalg.svd(r_b @ r_a.T)
    flipped = sign_convention(u, axis=0)
    sign = jnp.sum(flipped * u, axis=0)  # ±1 per column
    root = jnp.sqrt(s)
    b_new = q_b @ (flipped * root)
    a_new = ((vh * sign[:, None]) * root[:, None]) @ q_a.T
    return b_new.astype(b_mr.dtype), a_new.astype(a_rn.dtype)


def _keep_schedule(fresh, old):
    """``fresh`` with every ``optax.ScaleByScheduleState`` taken from ``old``."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda f, o: o if is_schedule(f) else f, fresh, old, is_leaf=is_schedule)


class RefactorState(NamedTuple):
    """State of :func:`lowrank_refactor`: the step ``count`` and ``inner``'s state."""

    count: jax.Array
    inner: optax.OptState


def _pairs(params, factors) -> list[tuple[int, int]]:
    """Leaf indices ``(i_B, i_A)`` of sibling leaves named ``factors``."""
    paths, _, _ = flatten(params)
    index = {p: i for i, p in enumerate(paths)}
    b_name, a_name = factors
    pairs = []
    for path, i in index.items():
        parent, _, name = path.rpartition("/")
        other = f"{parent}/{a_name}" if parent else a_name
        if name == b_name and other in index:
            pairs.append((i, index[other]))
    if not pairs:
        raise ValueError(
            f"lowrank_refactor: factors={factors!r} match no sibling pair of leaves; paths look "
            f"like {paths[:4]}"
        )
    return pairs


def lowrank_refactor(
    inner: optax.GradientTransformation, *, every: int, factors: tuple[str, str] = ("b", "a")
) -> optax.GradientTransformation:
    """``inner`` with refactorisation and momentum reset every ``every`` steps.

    On steps ``every, 2 every, ...`` (1-based), the update of each pair becomes
    ``balance_factors(B + u_B, A + u_A) - (B, A)`` and the inner state is reset to
    ``inner.init`` of the new weights; on the other steps this is ``inner`` unchanged. Leaves
    outside the pairs are updated by ``inner`` alone. Needs ``params`` in ``update``.

    Args:
      inner: the optimizer of the factors (and of every other leaf), e.g. ``optax.adamw(lr)``.
      every: the refactorisation period in steps (> 0).
      factors: leaf names of ``B`` [m, r] and ``A`` [r, n] under the same parent.

    Raises:
      ValueError: ``every`` <= 0, no pair found, factor shapes that do not chain, or
        ``update`` called without ``params``.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise ValueError(f"every={every!r} must be a positive int")

    def init_fn(params):
        _, xs, _ = flatten(params)
        for i_b, i_a in _pairs(params, factors):
            b, a = xs[i_b], xs[i_a]
            if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"lowrank_refactor: factors B {b.shape} and A {a.shape} do not chain"
                )
        return RefactorState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("lowrank_refactor needs params in update (it re-factors the weights)")
        pairs = _pairs(params, factors)
        updates, inner_state = inner.update(updates, state.inner, params)
        count = optax.safe_increment(state.count)

        def refactor(updates, inner_state):
            _, us, treedef = flatten(updates)
            _, ps, _ = flatten(params)
            us = list(us)
            new = [p if is_masked(p) else p + u for p, u in zip(ps, us)]  # masked: not ours
            for i_b, i_a in pairs:
                new[i_b], new[i_a] = balance_factors(new[i_b], new[i_a])
                us[i_b], us[i_a] = new[i_b] - ps[i_b], new[i_a] - ps[i_a]
            return treedef.unflatten(us), _keep_schedule(
                inner.init(treedef.unflatten(new)), inner_state
            )

        updates, inner_state = jax.lax.cond(
            count % every == 0, refactor, lambda u, s: (u, s), updates, inner_state
        )
        return updates, RefactorState(count, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
