"""DSFormer (Chand et al. 2023, "DSFormer: Effective Compression of Text-Transformers by
Dense-Sparse Weight Factorization", PAPERS.md §9): a weight w_IO [m, n] becomes the product
of a small dense matrix and a semi-structured sparse one, ``W ≈ D_mk · S_kn`` with S N:M
sparse (at most N non-zeros in every group of M consecutive entries along ``axis``; the
default axis 0 groups along k, the contraction axis of ``h_Bk · S_kn``, as 2:4 sparse tensor
cores want).

The factors are learned with the Straight-Through Factorizer: S is kept dense (a latent) and
the forward uses its N:M projection ``P(S)`` (the top-N magnitudes of each group kept), while
the backward treats P as the identity, so the latent receives the gradient taken with respect
to the masked factor (:func:`ste_nm`). The paper trains all factorisations jointly on the task
loss; :func:`dsformer_fit` is the layer-local version (weight reconstruction
``‖W − D P(S)‖_F²``, Adam on the latents, from the truncated SVD), usable as an initialisation
or on its own. Parameter count: ``m k + k n N / M`` values (the N:M index metadata not
counted), :func:`dsformer_params`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattn.convert.compensation import _matrix

__all__ = ["nm_mask", "nm_project", "ste_nm", "dsformer_params", "dsformer_fit"]


def _check_nm(n: int, m: int, size: int, axis_name: str):
    if not 1 <= n <= m:
        raise ValueError(f"n={n} must be in [1, m={m}]")
    if size % m:
        raise ValueError(f"the grouped axis {axis_name} ({size}) must be a multiple of m={m}")


def nm_mask(s, n: int, m: int, *, axis: int = 0):
    """The N:M mask of ``s`` (jnp bool, s's shape): in each group of ``m`` consecutive entries
    along ``axis``, the ``n`` of largest magnitude (ties to the earlier entry) are True.

    Raises:
      ValueError: n not in [1, m], or the axis length not a multiple of m.
    """
    s = jnp.asarray(s)
    if s.ndim != 2:
        raise ValueError(f"s must be a matrix [k, n], got shape {s.shape}")
    axis = axis % 2
    _check_nm(n, m, s.shape[axis], f"axis={axis}")
    t = jnp.moveaxis(s, axis, -1)  # [other, size]
    g = t.reshape(t.shape[0], -1, m)
    # rank of each entry in its group by descending magnitude, stable: argsort of argsort
    order = jnp.argsort(-jnp.abs(g), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    keep = (rank < n).reshape(t.shape)
    return jnp.moveaxis(keep, -1, axis)


def nm_project(s, n: int, m: int, *, axis: int = 0):
    """``P(s)``: s with all but the top-n magnitudes of each m-group along ``axis`` set to 0."""
    s = jnp.asarray(s)
    return jnp.where(nm_mask(s, n, m, axis=axis), s, 0)


def ste_nm(s, n: int, m: int, *, axis: int = 0):
    """The straight-through N:M factor: value ``P(s)``, derivative the identity, so
    ``∂L/∂s = ∂L/∂P(s)`` (the gradient w.r.t. the masked factor goes to the dense latent)."""
    s = jnp.asarray(s)
    return s + jax.lax.stop_gradient(nm_project(s, n, m, axis=axis) - s)


def dsformer_params(m_dim: int, n_dim: int, k: int, n: int, m: int) -> int:
    """The stored values of ``D [m_dim, k]`` dense and ``S [k, n_dim]`` N:M: ``m k + k n N/M``."""
    return m_dim * k + k * n_dim * n // m


def dsformer_fit(
    w_IO,
    *,
    k: int,
    n: int = 2,
    m: int = 4,
    axis: int = 0,
    steps: int = 2000,
    lr: float = 1e-3,
    log_every: int = 50,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit ``w_IO ≈ D P(S)`` by the straight-through factorizer (module docstring).

        Starts from the truncated SVD (``D = U_k Σ_k^(1/2)``, ``S = Σ_k^(1/2) V_kᵀ``, zero-padded
        past the matrix rank) and runs ``steps`` jitted Adam steps on ``‖W − D ste_nm(S)‖_F²`` (W
    scaled to unit norm, so ``lr`` does not depend on W's scale). Mask flips make the error
    non-monotone; the best recorded iterate (every ``log_every`` steps) is returned.

        Args:
          w_IO: the weight [m_dim, n_dim].
          k: the inner dimension, >= 1 (a multiple of m for axis 0).
          n, m: the N:M pattern of S (default 2:4), grouped along ``axis`` of S [k, n_dim].
          steps, lr: Adam steps (>= 1) and step size (> 0).
          log_every: the relative error is recorded (and the best iterate kept) every that many
            steps and at the end, >= 1.

        Returns:
          (D [m_dim, k], S_mask [k, n_dim], info), float64, S_mask N:M sparse: ``error``
          ‖W − D S_mask‖_F, ``relative_error`` that / ‖W‖_F, ``history`` [(step, relative error)]
          (step 0: the N:M projection of the SVD start; the result is the least of them),
          ``params`` :func:`dsformer_params`.
    """
    w = _matrix("w_IO", w_IO)
    m_dim, n_dim = w.shape
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    _check_nm(n, m, (k, n_dim)[axis % 2], f"axis={axis} of S [k={k}, n={n_dim}]")
    if steps < 1 or not lr > 0 or log_every < 1:
        raise ValueError(f"steps={steps}, log_every={log_every} must be >= 1 and lr={lr} > 0")
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    r = min(k, sv.size)
    d0 = np.zeros((m_dim, k))
    s0 = np.zeros((k, n_dim))
    d0[:, :r] = u[:, :r] * np.sqrt(sv[:r])
    s0[:r] = np.sqrt(sv[:r])[:, None] * vt[:r]
    norm = float(np.linalg.norm(w))
    scale = norm or 1.0
    wj = jnp.asarray(w / scale, jnp.float32)  # fit the unit-norm matrix: lr is scale-free
    p0 = (
        jnp.asarray(d0 / np.sqrt(scale), jnp.float32),
        jnp.asarray(s0 / np.sqrt(scale), jnp.float32),
    )

    def loss(p):
        return jnp.sum((wj - p[0] @ ste_nm(p[1], n, m, axis=axis)) ** 2)

    opt = optax.adam(lr)

    @jax.jit
    def chunk(p, state, count):
        def step(_, c):
            p, state = c
            g = jax.grad(loss)(p)
            upd, state = opt.update(g, state, p)
            return optax.apply_updates(p, upd), state

        return jax.lax.fori_loop(0, count, step, (p, state))

    def rel(p):
        d, s = p
        return float(jnp.linalg.norm(wj - d @ nm_project(s, n, m, axis=axis)))

    p, state = p0, opt.init(p0)
    history = [(0, rel(p))]
    best, best_p, done = history[0][1], p, 0
    while done < steps:
        c = min(log_every, steps - done)
        p, state = chunk(p, state, c)
        done += c
        history.append((done, rel(p)))
        if history[-1][1] < best:  # STE steps flip masks, so the error is not monotone
            best, best_p = history[-1][1], p
    d = np.asarray(best_p[0], np.float64) * np.sqrt(scale)
    s = np.asarray(nm_project(best_p[1], n, m, axis=axis), np.float64) * np.sqrt(scale)
    err = float(np.linalg.norm(w - d @ s))
    info = {
        "error": err,
        "relative_error": err / norm if norm else 0.0,
        "history": history,
        "params": dsformer_params(m_dim, n_dim, k, n, m),
    }
    return d, s, info
