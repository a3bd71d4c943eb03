"""SliceGPT (Ashkboos et al. 2024, PAPERS.md §9): rotate the residual stream, then slice it.

Computational invariance (§3.1): an RMSNorm without scale commutes with an orthogonal Q,
``x Q / ‖x Q‖ = (x / ‖x‖) Q``. So once every norm's scale γ is folded into the weights that read
the norm's output (``W <- diag(γ) W``, the paper's §3.2 step for RMSNorm models), rotating the
residual stream by Q — the embedding ``E <- E Q``, every reader ``W_in <- Qᵀ W_in``, every
writer ``W_out <- W_out Q``, ``b_out <- b_out Q`` — leaves the network's function unchanged.

Q is the PCA of the normalised activations (§3.3): the eigenvectors of ``Σ n nᵀ``, n = x / rms(x)
the inputs of the RMSNorms, largest eigenvalue first. Slicing keeps its first D' columns: the
residual stream becomes D'-dimensional, and the discarded share of the eigenvalues is the share
of the normalised activations' energy lost. The paper uses a Q per block with ``Q_lᵀ Q_(l+1)``
on each skip connection; a model without residual-path matrices takes one Q for the whole
stream, from the sum of the norms' covariances (:func:`pca_rotation`).

An RMSNorm over D' dims divides by ``sqrt(‖x'‖² / D' + eps)``; the paper's norm is ``x / ‖x‖``
over whatever dims remain. The model-level wrapper (``models.convert.slicegpt``) keeps that
meaning with the norm scale ``sqrt(D / D')`` and eps ``eps · D / D'``, so D' = D is exact.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pca_rotation", "rotate_reader", "rotate_writer"]


def pca_rotation(cov_DD, dim: int) -> tuple[np.ndarray, dict]:
    """The first ``dim`` principal directions of the normalised residual activations.

    Args:
      cov_DD: Σ n nᵀ (or its mean) of the RMSNorm inputs n = x / rms(x), [D, D].
      dim: D', in [1, D].

    Returns:
      (Q [D, D'] with orthonormal columns, largest eigenvalue first; info: ``discarded`` the
      share of the eigenvalues dropped, 0 at D' = D).

    Raises:
      ValueError: a non-square / non-finite covariance, or dim outside [1, D].
    """
    c = np.asarray(cov_DD, np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not np.isfinite(c).all():
        raise ValueError(f"cov_DD must be a finite square matrix [D, D], got shape {c.shape}")
    d = c.shape[0]
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
        raise ValueError(f"dim={dim} must be an int in [1, D = {d}]")
    lam, q = np.linalg.eigh((c + c.T) / 2)
    lam, q = np.clip(lam[::-1], 0, None), q[:, ::-1]
    total = float(lam.sum())
    info = {"discarded": float(lam[dim:].sum()) / total if total > 0 else 0.0}
    return q[:, :dim], info


def rotate_reader(entry: dict, q_DK: np.ndarray, scale_D=None) -> dict:
    """A Linear reading the residual stream (kernel [D, ...]): ``Qᵀ diag(γ) W``, bias kept.

    Args:
      entry: ``{"kernel": [D, ...], "bias"?: [...]}`` (``layer_params`` form).
      q_DK: the rotation's kept columns [D, D'].
      scale_D: the RMSNorm scale γ [D] folded in (None: none).

    Returns:
      the entry with kernel [D', ...].
    """
    w = np.asarray(entry["kernel"], np.float64)
    d = w.shape[0]
    if q_DK.shape[0] != d:
        raise ValueError(f"kernel {w.shape} must read the D = {q_DK.shape[0]} stream dims")
    w_DF = w.reshape(d, -1)
    if scale_D is not None:
        w_DF = np.asarray(scale_D, np.float64)[:, None] * w_DF
    return {**entry, "kernel": (q_DK.T @ w_DF).reshape(q_DK.shape[1], *w.shape[1:])}


def rotate_writer(entry: dict, q_DK: np.ndarray) -> dict:
    """A Linear writing the residual stream (kernel [..., D], bias [D]): ``W Q``, ``b Q``."""
    w = np.asarray(entry["kernel"], np.float64)
    d = w.shape[-1]
    if q_DK.shape[0] != d:
        raise ValueError(f"kernel {w.shape} must write the D = {q_DK.shape[0]} stream dims")
    out = {**entry, "kernel": (w.reshape(-1, d) @ q_DK).reshape(*w.shape[:-1], q_DK.shape[1])}
    if "bias" in entry:
        out["bias"] = np.asarray(entry["bias"], np.float64) @ q_DK
    return out
