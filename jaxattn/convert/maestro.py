"""Maestro (Horváth et al. 2024, "Maestro: Uncovering Low-Rank Structures via Trainable
Decomposition", PAPERS.md §9): a layer is trained already decomposed, ``W = Σ_i u_i v_iᵀ``
(u_IK [I, K], v_KO [K, O]), with *ordered dropout*: each step samples a keep-rank b in
[1, K] and the forward uses only the first b components, ``y = x u_IK[:, :b] v_KO[:b]``.
Leading components are thus trained in every sampled sub-model and trailing ones only in the
larger ones, which imposes an importance order. The paper's theory: for a linear map on
isotropic (uniform) inputs the learned prefixes are the truncated SVD of the target, and for
a linear autoencoder (y = x) the first b components span the top-b PCA subspace, for every b.
The trained layer is then cut hierarchically (only trailing components are removed, so any
prefix is a working sub-model): :func:`maestro_truncate`.

Pieces: :func:`ordered_dropout_forward` (jnp, the keep-rank may be traced),
:func:`sample_keep_rank`, :func:`maestro_objective` (one sampled b, or with no key its
expectation under uniform b: the mean over b = 1..K), :func:`maestro_train` (jitted plain
gradient descent on that expectation, or with ``ordered=False`` on the full-rank loss alone,
the baseline without ordered dropout) and :func:`maestro_truncate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.convert.compensation import _matrix

__all__ = [
    "ordered_dropout_forward",
    "sample_keep_rank",
    "maestro_objective",
    "maestro_train",
    "maestro_truncate",
]


def ordered_dropout_forward(x_BI, u_IK, v_KO, keep):
    """``x_BI (u_IK diag(1[k < keep]) v_KO)`` [B, O]: the decomposed layer with only its first
    ``keep`` components (``keep`` an int or a traced int scalar, clipped to [0, K])."""
    k = u_IK.shape[-1]
    if v_KO.shape[0] != k:
        raise ValueError(f"v_KO {v_KO.shape} must have u_IK's rank {k} rows")
    u_IK = jnp.where(jnp.arange(k) < keep, u_IK, 0)
    return jnp.einsum("bi,ik,ko->bo", x_BI, u_IK, v_KO)


def sample_keep_rank(key, rank: int):
    """A keep-rank b uniform in [1, ``rank``] (Maestro's ordered-dropout sample), int32 scalar."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    return jax.random.randint(key, (), 1, rank + 1)


def maestro_objective(u_IK, v_KO, x_BI, y_BO, *, key=None):
    """Maestro's training loss: ``mean_rows ‖x u_b v_b − y‖²`` at a keep-rank b sampled by
    :func:`sample_keep_rank` from ``key``; with ``key=None`` its expectation over uniform b,
    ``(1/K) Σ_{b=1..K} mean_rows ‖x u_b v_b − y‖²`` (deterministic, for plain GD)."""
    k = u_IK.shape[-1]
    if key is not None:
        r_BO = ordered_dropout_forward(x_BI, u_IK, v_KO, sample_keep_rank(key, k)) - y_BO
        return jnp.mean(jnp.sum(r_BO**2, -1))
    # all prefixes at once: the prefix-b output is the cumulative sum of per-component outputs
    h_BK = x_BI @ u_IK
    parts_BKO = h_BK[:, :, None] * v_KO[None]
    r_BKO = jnp.cumsum(parts_BKO, axis=1) - y_BO[:, None, :]
    return jnp.mean(jnp.sum(r_BKO**2, -1))


def maestro_train(
    x_BI,
    y_BO,
    *,
    rank: int,
    steps: int,
    lr: float,
    seed: int = 0,
    init_scale: float = 0.1,
    ordered: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit ``y ≈ x u v`` by ``steps`` jitted full-batch gradient-descent steps.

    Args:
      x_BI, y_BO: the data (rows are samples; y = x for a linear autoencoder).
      rank: K, the number of components, in [1, min(I, O)].
      steps, lr: gradient-descent steps (>= 1) and step size (> 0).
      seed, init_scale: u, v start as ``init_scale · N(0, 1/I)`` and ``init_scale · N(0, 1/K)``.
      ordered: the ordered-dropout expectation (:func:`maestro_objective`, key None); False
        trains the full-rank loss only (the baseline).

    Returns:
      (u_IK, v_KO, info), float64: ``loss`` the full-rank mean squared error per row at the
      end, ``prefix_loss`` [K] the same at each keep-rank b = 1..K.
    """
    x, y = _matrix("x_BI", x_BI), _matrix("y_BO", y_BO)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x_BI {x.shape} and y_BO {y.shape} must have the same rows")
    i_dim, o_dim = x.shape[1], y.shape[1]
    if not 1 <= rank <= min(i_dim, o_dim):
        raise ValueError(f"rank={rank} must be in [1, {min(i_dim, o_dim)}]")
    if steps < 1 or not lr > 0:
        raise ValueError(f"steps={steps} must be >= 1 and lr={lr} > 0")
    ku, kv = jax.random.split(jax.random.key(seed))
    u = init_scale * jax.random.normal(ku, (i_dim, rank)) / np.sqrt(i_dim)
    v = init_scale * jax.random.normal(kv, (rank, o_dim)) / np.sqrt(rank)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def loss(p):
        if ordered:
            return maestro_objective(p[0], p[1], xj, yj)
        r = xj @ p[0] @ p[1] - yj
        return jnp.mean(jnp.sum(r**2, -1))

    grad = jax.grad(loss)

    @jax.jit
    def run(p):
        def step(_, p):
            g = grad(p)
            return (p[0] - lr * g[0], p[1] - lr * g[1])

        return jax.lax.fori_loop(0, steps, step, p)

    u, v = run((u, v))
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    prefix = [
        float(np.mean(np.sum((x @ u[:, :b] @ v[:b] - y) ** 2, -1))) for b in range(1, rank + 1)
    ]
    return u, v, {"loss": prefix[-1], "prefix_loss": np.asarray(prefix)}


def maestro_truncate(
    u_IK, v_KO, *, rank: int | None = None, tol: float | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Hierarchical truncation: keep the first b components (trailing ones are cut, never
    interior ones, so the result is one of the trained prefixes).

    Args:
      u_IK, v_KO: the trained factors.
      rank: b given directly, in [1, K] (exclusive with ``tol``).
      tol: cut trailing components while their importance ``‖u_i‖ ‖v_i‖`` (the component's
        Frobenius norm ``‖u_i v_iᵀ‖_F``) is < tol; at least one component stays.

    Returns:
      (u_Ib, v_bO, info): ``rank`` b, ``importance`` [K] the per-component norms, ``error``
      ‖u v − u_b v_b‖_F (the change of the layer's matrix).
    """
    u, v = _matrix("u_IK", u_IK), _matrix("v_KO", v_KO)
    k = u.shape[1]
    if v.shape[0] != k:
        raise ValueError(f"v_KO {v.shape} must have u_IK's rank {k} rows")
    if (rank is None) == (tol is None):
        raise ValueError("maestro_truncate needs exactly one of rank= or tol=")
    imp = np.linalg.norm(u, axis=0) * np.linalg.norm(v, axis=1)
    if rank is not None:
        if not 1 <= rank <= k:
            raise ValueError(f"rank={rank} must be in [1, {k}]")
        b = rank
    else:
        if not tol >= 0:
            raise ValueError(f"tol={tol} must be >= 0")
        b = k
        while b > 1 and imp[b - 1] < tol:
            b -= 1
    err = float(np.linalg.norm(u[:, b:] @ v[b:]))
    return u[:, :b], v[:b], {"rank": b, "importance": imp, "error": err}
