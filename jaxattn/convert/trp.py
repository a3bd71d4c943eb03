"""TRP (Xu et al. 2019, "Trained Rank Pruning for Efficient Deep Neural Networks", PAPERS.md §9):
nuclear-norm regularised training alternated with low-rank truncation.

Two pieces, used inside any training loop on a weight w_IO [I, O] (``Linear.as_matrix``):

* The nuclear-norm sub-gradient. With the thin SVD ``W = U Σ Vᵀ`` of a matrix of rank r,
  ``∂‖W‖_* ∋ U_r V_rᵀ`` (the derivative itself where W has full rank and distinct non-zero σ).
  TRP adds ``λ U Vᵀ`` to the loss gradient of each regularised weight (the authors'
  ``nuclear_regularize``: ``grad += rate · U Vᵀ``), the stochastic sub-gradient step of
  ``loss + λ Σ ‖W‖_*``: it shrinks every singular value by the same ``lr · λ`` per step, so the
  small ones (noise) reach zero while the large ones (signal) survive.
* The truncation ``T(W)``: every few steps W is replaced by its rank-k SVD, k chosen by the
  paper's energy-pruning ratio e: the smallest k whose leading squared singular values keep a
  share e of the energy, ``Σ_{i<=k} σ_i² >= e Σ_i σ_i²``. Training then goes on from ``T(W)``;
  at the end the network is low-rank by construction and is factorised at that rank
  (:func:`trp_truncate` returns the factors A = U_k Σ_k^(1/2), B = Σ_k^(1/2) V_kᵀ).
"""

from __future__ import annotations

import numpy as np

from jaxattn.convert.compensation import _matrix, svd_compensation

__all__ = ["nuclear_subgradient", "energy_rank", "trp_truncate"]


def nuclear_subgradient(w_IO, *, rtol: float = 1e-10) -> np.ndarray:
    """``U_r V_rᵀ`` [I, O], the minimum-norm sub-gradient of ‖W‖_* (the gradient where W has
    full rank and distinct singular values).

    Args:
      w_IO: the weight [I, O].
      rtol: singular values <= ``rtol · σ_max`` count as zero (their directions get no
        sub-gradient: 0 is the least-norm choice on that face), >= 0.

    Returns:
      the sub-gradient, float64 [I, O]; zeros for a zero matrix.
    """
    w = _matrix("w_IO", w_IO)
    if not rtol >= 0:
        raise ValueError(f"rtol={rtol} must be >= 0")
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    keep = s > rtol * s.max() if s.size and s.max() > 0 else np.zeros_like(s, bool)
    return u[:, keep] @ vt[keep]


def energy_rank(sigma, energy: float) -> int:
    """TRP's energy-pruning rank: the smallest k with ``Σ_{i<=k} σ_i² >= energy · Σ σ_i²``.

    Args:
      sigma: singular values (any order), >= 0, not all zero.
      energy: the kept share e, in (0, 1].

    Returns:
      k in [1, len(sigma)].
    """
    s = np.sort(np.asarray(sigma, np.float64).ravel())[::-1]
    if s.size == 0 or not np.isfinite(s).all() or (s < 0).any() or s[0] == 0:
        raise ValueError("sigma must be finite singular values >= 0, not all zero")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy={energy} must be in (0, 1]")
    share = np.cumsum(s**2) / np.sum(s**2)
    # the share is rounded in the last place: e = 1 must reach the full (non-zero) rank
    k = int(np.searchsorted(share, energy * (1 - 1e-12), side="left")) + 1
    return min(k, int((s > 0).sum()))


def trp_truncate(
    w_IO, *, energy: float | None = None, rank: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """TRP's truncation step ``T(W)``: the rank-k SVD of ``w_IO``, k by :func:`energy_rank`
    (or given).

    Args:
      w_IO: the weight [I, O].
      energy: the energy-pruning ratio e in (0, 1] (exclusive with ``rank``).
      rank: k given directly, in [1, min(I, O)].

    Returns:
      (A [I, k], B [k, O], info): ``W ≈ A B``; ``rank`` k, ``energy`` the share kept,
      ``error`` ‖W − A B‖_F (= sqrt(Σ_{i>k} σ_i²)), ``relative_error`` that / ‖W‖_F.
    """
    w = _matrix("w_IO", w_IO)
    if (energy is None) == (rank is None):
        raise ValueError("trp_truncate needs exactly one of energy= or rank=")
    s = np.linalg.svd(w, compute_uv=False)
    k = energy_rank(s, energy) if energy is not None else rank
    a, b, info = svd_compensation(w, np.zeros_like(w), rank=k)  # checks a given rank
    info = {
        "rank": k,
        "energy": float(np.sum(s[:k] ** 2) / np.sum(s**2)) if s.max() > 0 else 1.0,
        "error": info["error"],
        "relative_error": info["relative_error"],
    }
    return a, b, info
