"""RTN quantization, ZeroQuant-V2 LoRC and EoRA on single matrices (PAPERS.md §9).

Faithful tests: RTN codes lie on the b-bit grid (at most 2^b levels per group, error at most
half a step); LoRC at full rank is exact, its error never exceeds quantization alone, falls with
the rank and equals the discarded singular values' norm (Eckart–Young–Mirsky). EoRA at full
rank is exact, with identity covariance it is LoRC, on anisotropic calibration inputs its
activation-weighted error is <= plain SVD's at the same rank, and it matches a direct transcript
of the paper's equations in its [out, in] layout.
"""

import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)
I, O = 24, 16
W = RNG.normal(0, 1, (I, O))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_rtn_grid_and_error(bits, symmetric, group_size):
    wq = C.rtn_quantize(W, bits=bits, group_size=group_size, symmetric=symmetric)
    g = group_size or I
    for grp in range(I // g):
        block, qb = W[grp * g : (grp + 1) * g], wq[grp * g : (grp + 1) * g]
        for o in range(O):
            col, qcol = block[:, o], qb[:, o]
            if symmetric:
                step = np.abs(col).max() / (2 ** (bits - 1) - 1)
            else:
                step = (col.max() - col.min()) / (2**bits - 1)
            codes = qcol / step
            if symmetric:  # integer multiples of the step
                np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)
            else:  # an integer offset from the zero point: differences are integer steps
                d = codes - codes[0]
                np.testing.assert_allclose(d, np.round(d), atol=1e-9)
            assert len(np.unique(np.round(codes, 6))) <= 2**bits
            assert np.abs(col - qcol).max() <= step / 2 + 1e-12
    # more bits, less error
    if bits < 8:
        finer = C.rtn_quantize(W, bits=8, group_size=group_size, symmetric=symmetric)
        assert np.linalg.norm(W - finer) < np.linalg.norm(W - wq)


def test_rtn_zero_group_and_bad_input():
    w = W.copy()
    w[:8, 0] = 0.0
    assert np.all(C.rtn_quantize(w, bits=4, group_size=8)[:8, 0] == 0.0)
    with pytest.raises(ValueError, match="bits"):
        C.rtn_quantize(W, bits=1)
    with pytest.raises(ValueError, match="group_size"):
        C.rtn_quantize(W, bits=4, group_size=5)
    with pytest.raises(ValueError, match="w_IO"):
        C.rtn_quantize(W[0], bits=4)


def test_lorc_eckart_young():
    wq = C.rtn_quantize(W, bits=3)
    sigma = np.linalg.svd(W - wq, compute_uv=False)
    quant_only = np.linalg.norm(W - wq)
    prev = quant_only
    for r in range(1, O + 1):
        wq2, a, b, info = C.lorc(W, rank=r, bits=3)
        np.testing.assert_array_equal(wq2, wq)
        assert a.shape == (I, r) and b.shape == (r, O)
        err = np.linalg.norm(W - (wq + a @ b))
        # Eckart–Young–Mirsky: ‖E − E_r‖_F = sqrt(Σ_{i>r} σ_i²)
        np.testing.assert_allclose(err, np.sqrt((sigma[r:] ** 2).sum()), atol=1e-10)
        np.testing.assert_allclose(info["error"], err, atol=1e-12)
        np.testing.assert_allclose(info["compressed_error"], quant_only, atol=1e-12)
        assert err <= prev + 1e-12  # non-increasing in r, never above quantization alone
        prev = err
    # full rank: exact W
    _, a, b, _ = C.lorc(W, rank=O, bits=2, group_size=8, symmetric=False)
    wq = C.rtn_quantize(W, bits=2, group_size=8, symmetric=False)
    np.testing.assert_allclose(wq + a @ b, W, atol=1e-10)


def test_lorc_bad_rank():
    for r in (0, O + 1, 2.0):
        with pytest.raises(ValueError, match="rank"):
            C.lorc(W, rank=r)
    with pytest.raises(ValueError, match="w_c_IO"):
        C.svd_compensation(W, W[:, :4], rank=2)


def _anisotropic_inputs(n=400):
    # inputs with a strongly decaying, rotated spectrum (the case EoRA is for)
    q, _ = np.linalg.qr(RNG.normal(size=(I, I)))
    scales = np.logspace(1, -2, I)
    return (RNG.normal(size=(n, I)) * scales) @ q.T


def _paper_eora(w_out_in, wc_out_in, x_in_n, r):
    """EoRA §3 verbatim, in the paper's layout: W [d_out, d_in], X [d_in, n]."""
    dw = w_out_in - wc_out_in
    lam, q = np.linalg.eigh(x_in_n @ x_in_n.T)  # X Xᵀ = Q Λ Qᵀ
    q_prime = q @ np.diag(np.sqrt(lam))  # Q' = Q Λ^(1/2)
    u, s, vt = np.linalg.svd(dw @ q_prime)  # ΔW' = ΔW Q' ≈ U_r Σ_r V_rᵀ
    b_prime, a_prime = u[:, :r] @ np.diag(s[:r]), vt[:r]  # B' = U_r Σ_r, A' = V_rᵀ
    return b_prime, a_prime @ np.linalg.inv(q_prime)  # B = B', A = A' Q'^(-1)


def test_eora_exact_identity_paper_and_better_than_svd():
    x = _anisotropic_inputs()
    cov = x.T @ x / len(x)
    wq = C.rtn_quantize(W, bits=3)
    e = W - wq
    # full rank: exact
    a, b, info = C.eora(W, wq, cov, rank=O)
    np.testing.assert_allclose(wq + a @ b, W, atol=1e-8)
    for r in (1, 4, 8):
        a, b, info = C.eora(W, wq, cov, rank=r)
        a_s, b_s, _ = C.svd_compensation(W, wq, rank=r)
        ours = np.linalg.norm(x @ (e - a @ b))
        plain = np.linalg.norm(x @ (e - a_s @ b_s))
        assert ours <= plain + 1e-9
        assert ours < 0.9 * plain  # strictly better on this spectrum
        np.testing.assert_allclose(info["weighted_error"], ours / np.sqrt(len(x)), rtol=1e-9)
        np.testing.assert_allclose(info["weighted_error_svd"], plain / np.sqrt(len(x)), rtol=1e-9)
        # the paper's equations, [out, in] layout: its B A is our (A B)ᵀ
        b_p, a_p = _paper_eora(W.T, wq.T, x.T, r)
        np.testing.assert_allclose((a @ b).T, b_p @ a_p, atol=1e-8)
    # identity covariance: plain SVD (LoRC)
    a, b, _ = C.eora(W, wq, np.eye(I), rank=5)
    a_s, b_s, _ = C.svd_compensation(W, wq, rank=5)
    np.testing.assert_allclose(a @ b, a_s @ b_s, atol=1e-10)


def test_eora_moments_and_bad_input():
    import jax.numpy as jnp

    x = _anisotropic_inputs(64)
    m = C.input_moments(jnp.asarray(x[None], jnp.float32))
    wq = C.rtn_quantize(W, bits=4)
    a, b, _ = C.eora(W, wq, m, rank=3)
    a2, b2, _ = C.eora(W, wq, x.T @ x / len(x), rank=3)
    np.testing.assert_allclose(a @ b, a2 @ b2, atol=1e-4)  # fp32 sums in the Moments
    with pytest.raises(ValueError, match="cov_II"):
        C.eora(W, wq, np.eye(I + 1), rank=3)
    with pytest.raises(ValueError, match="positive eigenvalue"):
        C.eora(W, wq, np.zeros((I, I)), rank=3)
    with pytest.raises(ValueError, match="rank"):
        C.eora(W, wq, np.eye(I), rank=O + 1)
    with pytest.raises(ValueError, match="eps"):
        C.eora(W, wq, np.eye(I), rank=2, eps=0.0)
