"""Feature-based low-rank compression (Yu et al. 2024, "Unified Low-rank Compression Framework
for Click-through Rate Prediction", PAPERS.md §9; the method is Atomic Feature Mimicking, AFM,
of Yu & Wu 2023, "Compressing Transformers: Features Are Low-Rank, but Weights Are Not!").

A layer ``y = x W + b`` (w_IO [I, O], ``Linear.as_matrix``) is compressed by fitting its
*output features* on calibration inputs, not its weights. With ȳ = E[y] and the output
covariance ``Cov(y) = E[(y − ȳ)ᵀ (y − ȳ)] = U Λ Uᵀ`` (from the input :class:`Moments`: ``Wᵀ
Cov(x) W``), the top-r eigenvectors U_r [O, r] reconstruct each output as
``ŷ = U_r U_rᵀ (y − ȳ) + ȳ``, i.e. the factorised layer

  ``ŷ = x A B + b'``,  A = W U_r [I, r],  B = U_rᵀ [r, O],  b' = b U_r U_rᵀ + ȳ (I − U_r U_rᵀ).

Its feature error ``E‖y − ŷ‖² = Σ_{i>r} λ_i`` is the least of any rank-r affine map of x (PCA:
the best r-dim affine subspace for the y's), so it is never above weight SVD's ``x W_r + b``,
whose outputs lie in an r-dim affine subspace too; at r = min(I, O) it is exact. With
``center=False`` (and no bias) U_r are the top right singular vectors of the calibration
output matrix X W and ``W_r = W U_r U_rᵀ`` is its Eckart–Young optimum: ‖X W − X W_r‖_F is the
discarded singular values' norm. An embedding table is the case ``w_IO = table [V, D]`` with
one-hot inputs, whose moments hold the token frequencies on the diagonal.
"""

from __future__ import annotations

import numpy as np

from jaxattn.convert._stats import Moments, covariance
from jaxattn.convert.compensation import _check_rank, _matrix, svd_compensation

__all__ = ["feature_lowrank"]


def _feature_error(moments: Moments, d_IO: np.ndarray, d_O: np.ndarray) -> float:
    """sqrt(E‖x D + d‖²) over the calibration inputs (the affine error map [D; d])."""
    return float(np.sqrt(max(np.trace(covariance(moments, np.vstack([d_IO, d_O]))), 0.0)))


def feature_lowrank(
    w_IO, b_O, moments: Moments, *, rank: int, center: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Rank-r compression of ``y = x W + b`` fitted on its output features (module docstring).

    Args:
      w_IO: the weight [I, O].
      b_O: the bias [O], or None.
      moments: calibration :class:`Moments` of the layer input x [I].
      rank: r, in [1, min(I, O)].
      center: fit the centred covariance and fold the mean into the bias (the paper's AFM;
        a layer without a bias gains one, ȳ (I − U_r U_rᵀ), unless its outputs are centred);
        False: the uncentred second moment (Eckart–Young on X W), only without a bias.

    Returns:
      (A [I, r], B [r, O], b' [O], info): the layer computes ``x A B + b'``; info has
      ``feature_error`` sqrt(E‖y − ŷ‖²), ``feature_error_svd`` the same for weight SVD at rank
      r (``x W_r + b``), ``relative_feature_error`` feature_error / sqrt(E‖y‖²), ``discarded``
      sqrt of the discarded eigenvalues' sum (= feature_error).

    Raises:
      ValueError: bad shapes, a rank out of range, center=False with a bias, no calibration.
    """
    w = _matrix("w_IO", w_IO)
    i, o = w.shape
    r = _check_rank(rank, w)
    b = np.zeros(o) if b_O is None else np.asarray(b_O, np.float64)
    if b.shape != (o,):
        raise ValueError(f"b_O must be [O] = [{o}], got shape {b.shape}")
    if not center and b_O is not None:
        raise ValueError("center=False fits E[yᵀy] without a mean: it needs b_O=None")
    if not isinstance(moments, Moments) or moments.x_D.shape != (i,):
        raise ValueError(f"moments must be the Moments of the layer input x [I] = [{i}]")
    w_aug = np.vstack([w, b])
    second = covariance(moments, w_aug)  # E[yᵀy] [O, O]
    mean = moments.augmented()[-1] @ w_aug  # ȳ = E[x̃] W̃ [O]
    c = second - np.outer(mean, mean) if center else second
    lam, u = np.linalg.eigh((c + c.T) / 2)
    lam, u = lam[::-1], u[:, ::-1]  # descending
    u_r = u[:, :r]
    p = u_r @ u_r.T
    a, bb = w @ u_r, u_r.T.copy()
    bias = b @ p + (mean - mean @ p if center else 0.0)
    a_svd, b_svd, _ = svd_compensation(w, np.zeros_like(w), rank=r)
    total = float(np.sqrt(max(np.trace(second), 0.0)))
    err = _feature_error(moments, a @ bb - w, bias - b)
    info = {
        "feature_error": err,
        "feature_error_svd": _feature_error(moments, a_svd @ b_svd - w, np.zeros(o)),
        "relative_feature_error": err / total if total > 0 else 0.0,
        "discarded": float(np.sqrt(max(lam[r:].clip(min=0).sum(), 0.0))),
    }
    return a, bb, bias, info
