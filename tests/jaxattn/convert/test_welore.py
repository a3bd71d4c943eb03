"""WeLore (PAPERS.md §9): the rank rule on matrices with known spectra, and the LRC split.

Faithful tests: min-max normalised singular values under one global τ give hand-computed
per-matrix ranks, different across matrices; the searched τ is the least one meeting the global
target; LRCs are the matrices pruned by more than min_ratio, N-LRCs stay dense; the factors are
the truncated SVD (an exactly low-rank matrix is reconstructed, the error is the discarded
spectrum's norm).
"""

import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)


def _with_spectrum(sigma, shape):
    u, _ = np.linalg.qr(RNG.normal(size=(shape[0], len(sigma))))
    v, _ = np.linalg.qr(RNG.normal(size=(shape[1], len(sigma))))
    return (u * np.asarray(sigma, np.float64)) @ v.T


SPECTRA = {
    "heavy": [10.0] + [1.0] * 7,  # s̃ = [1, 0, ..., 0]: everything but the top under any τ > 0
    "linear": list(np.linspace(10.0, 1.0, 8)),  # s̃ = k / 7
    "lowrank": [5.0, 3.0, 0.0, 0.0, 0.0, 0.0],  # s̃ = [1, 0.6, 0, 0, 0, 0]
}
WEIGHTS = {
    "heavy": _with_spectrum(SPECTRA["heavy"], (8, 12)),
    "linear": _with_spectrum(SPECTRA["linear"], (16, 8)),
    "lowrank": _with_spectrum(SPECTRA["lowrank"], (6, 10)),
}


def test_rank_rule_known_spectra():
    ranks, info = C.welore_ranks(SPECTRA, threshold=0.5)
    # heavy: 7 under τ; linear: k/7 < 0.5 for k = 0..3; lowrank: the 4 zeros
    assert info["pruned"] == {"heavy": 7, "linear": 4, "lowrank": 4}
    assert ranks == {"heavy": 1, "linear": 4, "lowrank": 2}
    assert len(set(ranks.values())) > 1  # non-uniform
    np.testing.assert_allclose(info["reduction"], 15 / 22)
    # min_ratio: linear (4/8 pruned) stays a dense N-LRC at full rank
    ranks, info = C.welore_ranks(SPECTRA, threshold=0.5, min_ratio=0.6)
    assert info["lrc"] == ["heavy", "lowrank"] and info["n_lrc"] == ["linear"]
    assert ranks["linear"] == 8
    np.testing.assert_allclose(info["reduction"], 11 / 22)
    # τ = 0 prunes nothing: every matrix an N-LRC
    ranks, info = C.welore_ranks(SPECTRA, threshold=0.0)
    assert info["lrc"] == [] and ranks == {"heavy": 8, "linear": 8, "lowrank": 6}


@pytest.mark.parametrize("target", [0.1, 0.4, 0.6, 0.75])
@pytest.mark.parametrize("min_ratio", [0.0, 0.6])
def test_searched_threshold_is_least_meeting_target(target, min_ratio):
    _, info = C.welore_ranks(SPECTRA, reduction=target, min_ratio=min_ratio)
    assert info["reduction"] >= target
    below = C.welore_ranks(
        SPECTRA, threshold=float(np.nextafter(info["threshold"], -np.inf)), min_ratio=min_ratio
    )[1]
    assert below["reduction"] < target


def test_factors_are_truncated_svd():
    out, info = C.welore(WEIGHTS, threshold=0.5, min_ratio=0.6)
    assert info["lrc"] == ["heavy", "lowrank"]
    a, b = out["lowrank"]
    assert a.shape == (6, 2) and b.shape == (2, 10)
    np.testing.assert_allclose(a @ b, WEIGHTS["lowrank"], atol=1e-10)  # exactly rank 2
    a, b = out["heavy"]
    w = WEIGHTS["heavy"]
    dropped = np.sqrt(7.0)  # seven unit singular values discarded (Eckart–Young)
    np.testing.assert_allclose(np.linalg.norm(w - a @ b), dropped, atol=1e-10)
    np.testing.assert_allclose(info["errors"]["heavy"], dropped / np.linalg.norm(w), atol=1e-12)
    assert out["linear"] is not None and np.array_equal(out["linear"], WEIGHTS["linear"])


def test_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        C.welore_ranks(SPECTRA)
    with pytest.raises(ValueError, match="exactly one"):
        C.welore_ranks(SPECTRA, reduction=0.3, threshold=0.3)
    with pytest.raises(ValueError, match="threshold"):
        C.welore_ranks(SPECTRA, threshold=1.5)
    with pytest.raises(ValueError, match="reduction"):
        C.welore_ranks(SPECTRA, reduction=1.0)
    with pytest.raises(ValueError, match="min_ratio"):
        C.welore_ranks(SPECTRA, threshold=0.2, min_ratio=1.0)
    with pytest.raises(ValueError, match="out of reach"):
        C.welore_ranks(SPECTRA, reduction=0.9)
    with pytest.raises(ValueError, match="spectrum"):
        C.welore_ranks({"x": [1.0, -1.0]}, threshold=0.2)
    with pytest.raises(ValueError, match="not matrices"):
        C.welore({"x": np.ones(3)}, threshold=0.2)
