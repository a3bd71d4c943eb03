"""Low-rank compensation of a compressed weight: ZeroQuant-V2's LoRC and EoRA (PAPERS.md §9).

A weight w_IO [I, O] (``x · W`` layout, ``Linear.as_matrix``) compressed to W_c (quantized by
:func:`~jaxattn.convert.rtn.rtn_quantize`, pruned, ...) leaves the error ΔW = W − W_c. Both
methods add back a rank-r path, ``x · (W_c + A_IR · B_RO)``:

LoRC (Yao et al. 2023, "ZeroQuant-V2", §5): the top-r SVD of the error, ΔW = U Σ Vᵀ,
  A = U_r Σ_r^(1/2),  B = Σ_r^(1/2) V_rᵀ.
  By Eckart–Young–Mirsky, ‖ΔW − A B‖_F = sqrt(Σ_{i>r} σ_i²), the least possible at rank r.

EoRA (Liu et al. 2024, "EoRA", §3): the error that matters is ‖X (ΔW − A B)‖_F over the
  calibration inputs X [n, I]. With XᵀX = Q Λ Qᵀ (eigendecomposition) and Q' = Q Λ^(1/2),
  ‖X M‖_F = ‖Q'ᵀ M‖_F, so the error is projected into the eigenspace, ΔW' = Q'ᵀ ΔW
  (the paper's ``ΔW Q'`` in its [out, in] layout), truncated there, ΔW' ≈ U_r Σ_r V_rᵀ, and
  projected back:  A = Q'^(-ᵀ) U_r = Q Λ^(-1/2) U_r,  B = Σ_r V_rᵀ  (the paper's B' = U_r Σ_r,
  A = V_rᵀ Q'^(-1), transposed). That is the optimum of the activation-weighted error at rank r;
  with XᵀX ∝ I it is LoRC. Eigenvalues are floored at ``eps · λ_max`` so Λ^(-1/2) stays finite
  (a direction the data never visits costs nothing either way; at full rank A B = ΔW exactly).
"""

from __future__ import annotations

import numpy as np

from jaxattn.convert._stats import Moments
from jaxattn.convert.rtn import rtn_quantize

__all__ = ["svd_compensation", "lorc", "eora"]


def _matrix(name: str, x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a matrix [I, O], got shape {x.shape}")
    return x


def _pair(w_IO, w_c_IO):
    w, wc = _matrix("w_IO", w_IO), _matrix("w_c_IO", w_c_IO)
    if w.shape != wc.shape:
        raise ValueError(f"w_c_IO {wc.shape} must have w_IO's shape {w.shape}")
    return w, wc


def _check_rank(rank, w: np.ndarray) -> int:
    top = min(w.shape)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= top:
        raise ValueError(f"rank={rank} must be an int in [1, min(I, O) = {top}]")
    return int(rank)


def svd_compensation(w_IO, w_c_IO, *, rank: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """LoRC's rank-r compensation of ``w_IO − w_c_IO`` by its truncated SVD.

    Args:
      w_IO: the original weight [I, O].
      w_c_IO: the compressed weight [I, O].
      rank: r, in [1, min(I, O)].

    Returns:
      (A [I, r], B [r, O], info): ``error`` = ‖W − W_c − A B‖_F, ``compressed_error`` =
      ‖W − W_c‖_F, ``relative_error`` = error / ‖W‖_F.
    """
    w, wc = _pair(w_IO, w_c_IO)
    r = _check_rank(rank, w)
    e = w - wc
    u, s, vt = np.linalg.svd(e, full_matrices=False)
    root = np.sqrt(s[:r])
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    err = float(np.linalg.norm(e - a @ b))
    norm = float(np.linalg.norm(w))
    info = {
        "error": err,
        "compressed_error": float(np.linalg.norm(e)),
        "relative_error": err / norm if norm > 0 else 0.0,
    }
    return a, b, info


def lorc(
    w_IO, *, rank: int, bits: int = 4, group_size: int | None = None, symmetric: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """ZeroQuant-V2 LoRC: RTN-quantize ``w_IO``, then compensate the error at rank r.

    Args:
      w_IO: the weight [I, O].
      rank: r of the compensation, in [1, min(I, O)].
      bits, group_size, symmetric: :func:`~jaxattn.convert.rtn.rtn_quantize`'s options.

    Returns:
      (Q(W) [I, O], A [I, r], B [r, O], info as :func:`svd_compensation`'s); the layer
      computes ``x · (Q(W) + A B)``.
    """
    w = _matrix("w_IO", w_IO)
    _check_rank(rank, w)
    w_q = rtn_quantize(w, bits=bits, group_size=group_size, symmetric=symmetric)
    a, b, info = svd_compensation(w, w_q, rank=rank)
    return w_q, a, b, info


def _input_covariance(cov, i: int) -> np.ndarray:
    if isinstance(cov, Moments):
        cov = cov.augmented()[:-1, :-1]  # E[x xᵀ]: the bias row does not meet ΔW
    c = np.asarray(cov, np.float64)
    if c.shape != (i, i):
        raise ValueError(
            f"cov_II must be [I, I] = [{i}, {i}] (E[x xᵀ] of the input), got {c.shape}"
        )
    if not np.isfinite(c).all():
        raise ValueError("cov_II has non-finite entries")
    return (c + c.T) / 2


def _weighted(c: np.ndarray, m: np.ndarray) -> float:
    """sqrt(tr(Mᵀ C M)) = ‖X M‖_F / sqrt(n) for C = XᵀX / n."""
    return float(np.sqrt(max(np.einsum("io,ij,jo->", m, c, m), 0.0)))


def eora(
    w_IO, w_c_IO, cov_II, *, rank: int, eps: float = 1e-8
) -> tuple[np.ndarray, np.ndarray, dict]:
    """EoRA: eigenspace-projected rank-r compensation of ``w_IO − w_c_IO`` (module docstring).

    Args:
      w_IO: the original weight [I, O].
      w_c_IO: the compressed weight [I, O].
      cov_II: E[x xᵀ] of the layer input [I, I], or its calibration :class:`Moments`.
      rank: r, in [1, min(I, O)].
      eps: eigenvalue floor relative to the largest eigenvalue, > 0.

    Returns:
      (A [I, r], B [r, O], info): ``weighted_error`` = sqrt(E‖x (ΔW − A B)‖²) on the
      calibration inputs, ``weighted_error_svd`` the same for LoRC's plain SVD at rank r,
      ``weighted_error_compressed`` for no compensation, ``error`` = ‖ΔW − A B‖_F.

    Raises:
      ValueError: mismatched shapes, a rank out of range, a zero covariance, eps <= 0.
    """
    w, wc = _pair(w_IO, w_c_IO)
    r = _check_rank(rank, w)
    c = _input_covariance(cov_II, w.shape[0])
    if not eps > 0:
        raise ValueError(f"eps={eps} must be > 0")
    lam, q = np.linalg.eigh(c)
    if lam.max() <= 0:
        raise ValueError("cov_II has no positive eigenvalue (no calibration signal)")
    lam = np.maximum(lam, eps * lam.max())  # Λ^(-1/2) finite; see the module docstring
    root = np.sqrt(lam)
    e = w - wc
    e_proj = root[:, None] * (q.T @ e)  # ΔW' = Q'ᵀ ΔW = Λ^(1/2) Qᵀ ΔW
    u, s, vt = np.linalg.svd(e_proj, full_matrices=False)
    a = q @ (u[:, :r] / root[:, None])  # Q Λ^(-1/2) U_r
    b = s[:r, None] * vt[:r]  # Σ_r V_rᵀ
    a_svd, b_svd, _ = svd_compensation(w, wc, rank=r)
    info = {
        "weighted_error": _weighted(c, e - a @ b),
        "weighted_error_svd": _weighted(c, e - a_svd @ b_svd),
        "weighted_error_compressed": _weighted(c, e),
        "error": float(np.linalg.norm(e - a @ b)),
    }
    return a, b, info
