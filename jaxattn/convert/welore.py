"""WeLore (Jaiswal et al. 2024, "From GaLore to WeLore", PAPERS.md §9): non-uniform ranks from
the singular-value decay, and the LRC / N-LRC split. Data-agnostic and one-shot.

The rule, as the authors' code applies it (``adaptive_rank_pruning``, ``do_rank_reduction``):
each matrix's singular values are min-max normalised, ``s̃_i = (σ_i − σ_min) / (σ_max − σ_min)``,
and one global threshold τ prunes the ``#{i : s̃_i < τ}`` directions of every matrix. A matrix
with a heavy-tailed spectrum (few large σ, a long flat tail near σ_min) loses most of its rank;
a flat spectrum loses little. A matrix whose pruned share exceeds ``min_ratio`` is a Low-rank
Component (LRC), stored as W ≈ A B with A = U_k Σ_k^(1/2), B = Σ_k^(1/2) V_kᵀ (k = kept rank)
and fine-tuned; the others are Non-Low-rank Components (N-LRC), kept dense and frozen.

The paper tabulates τ per model for a target effective rank reduction; :func:`welore_ranks`
finds it: the least τ whose reduction over the LRCs, Σ_LRC pruned / Σ_all min(I, O), reaches
``reduction`` (the reduction grows with τ, so a search over the normalised values finds it).
"""

from __future__ import annotations

import numpy as np

from jaxattn.convert.compensation import svd_compensation

__all__ = ["welore_ranks", "welore"]


def _normalised(sigma) -> np.ndarray:
    s = np.sort(np.asarray(sigma, np.float64))[::-1]
    if s.ndim != 1 or len(s) == 0 or not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("each spectrum must be a non-empty 1-D array of singular values >= 0")
    span = s[0] - s[-1]
    return (s - s[-1]) / span if span > 0 else np.ones_like(s)  # a flat spectrum: nothing pruned


def _split(norm: dict, tau: float, min_ratio: float):
    pruned = {n: int((s < tau).sum()) for n, s in norm.items()}
    lrc = [n for n in norm if pruned[n] / len(norm[n]) > min_ratio]
    total = sum(len(s) for s in norm.values())
    return pruned, lrc, sum(pruned[n] for n in lrc) / total


def welore_ranks(
    spectra: dict, *, reduction: float | None = None, threshold: float | None = None,
    min_ratio: float = 0.0,
) -> tuple[dict, dict]:  # fmt: skip
    """Per-matrix kept ranks from the singular spectra by WeLore's rule (module docstring).

    Args:
      spectra: {name: singular values of that matrix} (any order).
      reduction: the target effective rank reduction in [0, 1): τ is searched (exclusive
        with ``threshold``).
      threshold: τ in [0, 1] given directly.
      min_ratio: a matrix is an LRC when its pruned share exceeds this, in [0, 1).

    Returns:
      ({name: kept rank k (full for N-LRCs)}, info: ``threshold`` τ, ``reduction`` reached,
      ``lrc`` / ``n_lrc`` name lists, ``pruned`` {name: directions under τ}).

    Raises:
      ValueError: neither or both of reduction / threshold, values out of range, a bad
        spectrum, a reduction no τ reaches (name the largest possible).
    """
    if (reduction is None) == (threshold is None):
        raise ValueError("welore_ranks needs exactly one of reduction= or threshold=")
    if not 0.0 <= min_ratio < 1.0:
        raise ValueError(f"min_ratio={min_ratio} must be in [0, 1)")
    if not spectra:
        raise ValueError("spectra is empty")
    norm = {n: _normalised(s) for n, s in spectra.items()}
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be in [0, 1]")
        tau = float(threshold)
    else:
        if not 0.0 <= reduction < 1.0:
            raise ValueError(f"reduction={reduction} must be in [0, 1)")
        # candidates: just above each normalised value below 1 (s̃ = 1 is never pruned)
        cands = np.unique(np.concatenate([s[s < 1] for s in norm.values()] + [np.zeros(0)]))
        cands = np.concatenate([[0.0], np.nextafter(cands, np.inf)])
        top = _split(norm, cands[-1], min_ratio)[2]
        if top < reduction - 1e-12:
            raise ValueError(
                f"reduction={reduction} is out of reach: at most {top:.4f} with "
                f"min_ratio={min_ratio} (each matrix keeps its largest singular value)"
            )
        lo, hi = 0, len(cands) - 1  # the reduction grows with τ: bisect for the least τ
        while lo < hi:
            mid = (lo + hi) // 2
            if _split(norm, cands[mid], min_ratio)[2] >= reduction - 1e-12:
                hi = mid
            else:
                lo = mid + 1
        tau = float(cands[lo])
    pruned, lrc, reached = _split(norm, tau, min_ratio)
    ranks = {n: len(s) - pruned[n] if n in lrc else len(s) for n, s in norm.items()}
    info = {
        "threshold": tau,
        "reduction": reached,
        "lrc": lrc,
        "n_lrc": [n for n in norm if n not in lrc],
        "pruned": pruned,
    }
    return ranks, info


def welore(
    weights: dict, *, reduction: float | None = None, threshold: float | None = None,
    min_ratio: float = 0.0,
) -> tuple[dict, dict]:  # fmt: skip
    """WeLore on a set of matrices: ranks by :func:`welore_ranks`, LRCs factorised.

    Args:
      weights: {name: w_IO [I, O]} (``Linear.as_matrix``).
      reduction, threshold, min_ratio: :func:`welore_ranks`'s.

    Returns:
      ({name: (A [I, k], B [k, O]) for an LRC, or w_IO itself for an N-LRC},
      info: :func:`welore_ranks`'s plus ``ranks`` and ``errors`` {LRC: ‖W − A B‖_F / ‖W‖_F}).
    """
    mats = {n: np.asarray(w, np.float64) for n, w in weights.items()}
    bad = [n for n, w in mats.items() if w.ndim != 2]
    if bad:
        raise ValueError(f"weights {bad} are not matrices [I, O]")
    spectra = {n: np.linalg.svd(w, compute_uv=False) for n, w in mats.items()}
    ranks, info = welore_ranks(spectra, reduction=reduction, threshold=threshold,
                               min_ratio=min_ratio)  # fmt: skip
    out, errors = {}, {}
    for n, w in mats.items():
        if n in info["lrc"]:
            a, b, e = svd_compensation(w, np.zeros_like(w), rank=ranks[n])
            out[n] = (a, b)
            errors[n] = e["relative_error"]
        else:
            out[n] = w
    info = {**info, "ranks": ranks, "errors": errors}
    return out, info
