"""Projector bases for the GaLore family: exact SVD, randomized subspace iteration, DCT.

A projector turns the gradient matrix ``G_mn`` into a left basis ``P_mr`` (orthonormal
columns) and/or a right basis ``Q_rn`` (orthonormal rows). All three are computed from the
gradient inside the compiled step and never produce NaN:

* the gradient is divided by its largest magnitude before any factorisation (singular vectors
  do not change under positive scaling), so gradients of 1e-30 or 1e30 factorise like O(1)
  ones;
* a gradient that is all zero or not finite, or a factorisation that comes out not finite,
  keeps the previous basis (the first basis is the first ``r`` unit vectors), so the state is
  never poisoned.

Sign convention (SVD and randomized): every basis vector — a column of ``P``, a row of ``Q`` —
has its largest-magnitude entry positive (the first such entry on ties). Singular vectors are
otherwise defined up to sign, which differs between LAPACK builds, backends and libraries, and
GaLore keeps its moments across refreshes, so without a convention runs would not reproduce.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattn.optim._plan import LeafPlan

__all__ = ["SVD", "Randomized", "DCT", "sign_convention", "dct_basis", "PROJECTORS"]


def sign_convention(vectors: jax.Array, axis: int) -> jax.Array:
    """``vectors`` with each vector (the entries along ``axis``) flipped so that its
    largest-magnitude entry is positive. ``axis=0`` for the columns of ``P_mr``, ``axis=1`` for
    the rows of ``Q_rn``."""
    idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
    sign = jnp.sign(jnp.take_along_axis(vectors, idx, axis=axis))
    return vectors * jnp.where(sign == 0, 1, sign).astype(vectors.dtype)


def _normalised(g_mn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(G / max|G|, usable)``: fp32, scaled to max magnitude 1; ``usable`` is False for a zero
    or non-finite gradient (then the result is meaningless and the old basis is kept)."""
    g = g_mn.astype(jnp.float32)
    peak = jnp.max(jnp.abs(g))
    usable = jnp.isfinite(peak) & (peak > 0)
    return g / jnp.where(usable, peak, 1.0), usable


def _keep_if_bad(usable, new, old):
    """``new`` where it is usable and finite, else ``old`` (a MaskedNode passes through)."""
    if isinstance(old, optax.MaskedNode):
        return old
    ok = usable & jnp.all(jnp.isfinite(new))
    return jnp.where(ok, new.astype(old.dtype), old)


def _eye_left(plan: LeafPlan, dtype):
    return jnp.eye(plan.m, plan.rank, dtype=dtype) if plan.left else optax.MaskedNode()


def _eye_right(plan: LeafPlan, dtype):
    return jnp.eye(plan.rank, plan.n, dtype=dtype) if plan.right else optax.MaskedNode()


class _MatrixBasis:
    """Projectors whose state is the basis itself: left ``P_mr``, right ``Q_rn``."""

    def init(self, plan: LeafPlan, dtype):
        return _eye_left(plan, dtype), _eye_right(plan, dtype)

    def left_matrix(self, state, plan: LeafPlan, dtype):
        return state.astype(dtype)

    def right_matrix(self, state, plan: LeafPlan, dtype):
        return state.astype(dtype)

    def refresh(self, g_mn, plan: LeafPlan, old_left, old_right, key):
        g, usable = _normalised(g_mn)
        u_mr, vh_rn = self._factor(g, plan.rank, key)
        left = sign_convention(u_mr, axis=0) if plan.left else None
        right = sign_convention(vh_rn, axis=1) if plan.right else None
        return (
            _keep_if_bad(usable, left, old_left),
            _keep_if_bad(usable, right, old_right),
        )


@dataclasses.dataclass(frozen=True)
class SVD(_MatrixBasis):
    """Exact truncated SVD: ``P`` = top-r left singular vectors, ``Q`` = top-r right ones
    (galore-torch's projector). Cost per refresh: one thin SVD of ``[m, n]``."""

    def _factor(self, g, r, key):
        del key
        u, _, vh = jnp.linalg.svd(g, full_matrices=False)
        return u[:, :r], vh[:r, :]


@dataclasses.dataclass(frozen=True)
class Randomized(_MatrixBasis):
    """Randomized SVD by subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

    With ``k = min(r + oversample, m, n)`` and a Gaussian ``Ω_nk`` drawn from ``seed``, the
    leaf's index and the step: ``Y = G Ω``; ``power_iters`` times ``Y = G orth(Gᵀ orth(Y))``;
    ``B_kn = orth(Y)ᵀ G``; ``P, Q`` from the thin SVD of ``B``. Cost per refresh:
    ``O(m n k (2 power_iters + 2))`` instead of the SVD's ``O(m n min(m, n))``.
    """

    oversample: int = 8
    power_iters: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.oversample < 0 or self.power_iters < 0:
            raise ValueError(f"{self.oversample=} and {self.power_iters=} must be >= 0")

    def _factor(self, g, r, key):
        m, n = g.shape
        k = min(r + self.oversample, m, n)
        y = g @ jax.random.normal(key, (n, k), jnp.float32)
        for _ in range(self.power_iters):
            q, _ = jnp.linalg.qr(y)
            z, _ = jnp.linalg.qr(g.T @ q)
            y = g @ z
        q, _ = jnp.linalg.qr(y)
        ub, _, vh = jnp.linalg.svd(q.T @ g, full_matrices=False)
        return q @ ub[:, :r], vh[:r, :]


def dct_basis(size: int, indices: jax.Array | None = None, dtype=jnp.float32) -> jax.Array:
    """Columns ``indices`` (default all) of the orthonormal DCT-II basis ``Q_NN``:
    ``Q[i, k] = a_k cos(π (2i + 1) k / 2N)``, ``a_0 = sqrt(1/N)``, ``a_k = sqrt(2/N)``.

    ``Qᵀ x`` is ``jax.scipy.fft.dct(x, type=2, norm="ortho")``. The angle is reduced modulo 2π
    in integers, so it is exact for any N (a float product (2i+1)k loses digits past 2**24).

    Returns:
      ``[size, len(indices)]``.
    """
    k = jnp.arange(size, dtype=jnp.int32) if indices is None else indices.astype(jnp.int32)
    i = jnp.arange(size, dtype=jnp.int32)[:, None]
    phase = ((2 * i + 1) * k[None, :]) % (4 * size)  # cos period 2π = 4N units of π/2N
    scale = jnp.where(k == 0, np.sqrt(1.0 / size), np.sqrt(2.0 / size)).astype(jnp.float32)
    return (jnp.cos(phase.astype(jnp.float32) * (np.pi / (2 * size))) * scale).astype(dtype)


@dataclasses.dataclass(frozen=True)
class DCT:
    """SVD-free projection ("SVD-Free Low-Rank Adaptive Gradient Optimization for Large
    Language Models"): the basis is the fixed orthonormal DCT-II matrix ``Q_NN`` of
    the projected side; a refresh keeps the ``r`` columns best aligned with the gradient, by the
    score ``‖Qᵀ G‖`` per row (left side; ``‖G Q‖`` per column for the right side), sorted by
    score. The scores are one DCT of ``G`` (an FFT, ``O(m n log)``) plus a top-k.

    State: only the selected indices, ``int32 [r]`` per side; the projector is rebuilt from them
    each step (:func:`dct_basis`). Initial indices: ``0..r-1`` (the lowest frequencies).
    """

    def init(self, plan: LeafPlan, dtype):
        idx = jnp.arange(plan.rank, dtype=jnp.int32)
        return (idx if plan.left else optax.MaskedNode()), (
            idx if plan.right else optax.MaskedNode()
        )

    def left_matrix(self, state, plan: LeafPlan, dtype):
        return dct_basis(plan.m, state, dtype)

    def right_matrix(self, state, plan: LeafPlan, dtype):
        return dct_basis(plan.n, state, dtype).T

    def refresh(self, g_mn, plan: LeafPlan, old_left, old_right, key):
        del key
        g, usable = _normalised(g_mn)
        left, right = old_left, old_right
        if plan.left:  # score of column k: ‖(Qᵀ G)[k, :]‖
            scores = jnp.sum(jnp.square(jax.scipy.fft.dct(g, type=2, norm="ortho", axis=0)), 1)
            left = jnp.where(usable, jax.lax.top_k(scores, plan.rank)[1], old_left)
        if plan.right:  # score of column k: ‖(G Q)[:, k]‖
            scores = jnp.sum(jnp.square(jax.scipy.fft.dct(g, type=2, norm="ortho", axis=1)), 0)
            right = jnp.where(usable, jax.lax.top_k(scores, plan.rank)[1], old_right)
        return left, right


PROJECTORS = {"svd": SVD, "randomized": Randomized, "dct": DCT}


def resolve(projector) -> SVD | Randomized | DCT:
    """A projector instance from a name in ``PROJECTORS`` or an instance."""
    if isinstance(projector, str):
        if projector not in PROJECTORS:
            raise ValueError(f"projector={projector!r} is not one of {tuple(PROJECTORS)}")
        return PROJECTORS[projector]()
    if not isinstance(projector, SVD | Randomized | DCT):
        raise ValueError(
            f"projector={projector!r} must be a name in {tuple(PROJECTORS)} or one "
            "of SVD(), Randomized(...), DCT()"
        )
    return projector
