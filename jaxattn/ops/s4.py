"""``jaxattn.ops.s4``: S4's structured state space, by Cauchy kernel (training) or recurrence.

Gu, Goel and Ré 2022, "Efficiently Modeling Long Sequences with Structured State Spaces"
(arXiv 2111.00396). Per channel h the SSM x' = A x + B u, y = C x + D u is discretised with
the bilinear transform at step Δ_h (Eq. 3):

    Ā = (I − Δ/2 A)⁻¹ (I + Δ/2 A),   B̄ = (I − Δ/2 A)⁻¹ Δ B,   x_k = Ā x_{k−1} + B̄ u_k,

and over L steps it is the causal convolution y = K̄ * u + D u with K̄_j = C Ā^j B̄ (Eq. 4-5).
A is normal plus low rank (NPLR, Thm. 1): HiPPO-LegS A = V (Λ − P̃ P̃*) V*, so in the
eigenbasis A = Λ − P P* (diagonal Λ, rank-1 P). Conjugate eigenpairs make a real SSM of
state size N the complex one of M = N / 2 modes with y = 2 Re(C x) (N must be even), as the
authors' code does.

The kernel's generating function at the L roots of unity ω_k = exp(−2πi k / L), with
C̃ = C (I − Ā^L) (the learned parameter, Lemma C.2) is

    K̂(ω) = Σ_{j<L} C̄ Ā^j B̄ ω^j = C̃ (I − Ā ω)⁻¹ B̄ = Δ C̃ (a I − b A)⁻¹ B,
    a = 1 − ω,  b = Δ (1 + ω) / 2,

which is the paper's 2/(1+ω) C̃ R(ω) B form, R(ω) = (2/Δ (1−ω)/(1+ω) − A)⁻¹, multiplied out
so that ω = −1 (k = L/2 for even L) is finite. With A = Λ − P P*, Woodbury reduces
(a I − b A)⁻¹ to Cauchy sums Σ_n u_n w_n / (a − b Λ_n) (Thm. 3):

    K̂ = Δ [k_CB − b k_CP k_PB / (1 + b k_PP)],   k_XY(ω) = Σ_n X_n Y_n / (a − b Λ_n)

(X = C̃ or P*, Y = B or P), and K̄ = Re ifft(K̂) · 2. The convolution runs through an FFT of
length 2L. For decoding, :func:`s4_recurrence` gives Ā, B̄ and C = C̃ (I − Ā^L)⁻¹ (dense
M × M per channel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "hippo_legs",
    "hippo_dplr",
    "s4_init",
    "s4_kernel",
    "s4_convolve",
    "s4_recurrence",
    "s4_scan",
]


def hippo_legs(n: int):
    """HiPPO-LegS (A, B), float64 numpy: A_nk = −√(2n+1)√(2k+1) (n > k), −(n+1) (n = k), 0."""
    if n < 1:
        raise ValueError(f"state size n={n} must be >= 1")
    q = np.sqrt(2.0 * np.arange(n) + 1.0)
    a = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(n) + 1.0)
    return a, q.copy()


def hippo_dplr(n: int):
    """The NPLR form of HiPPO-LegS, full size: A = V (diag(Λ) − P̃ P̃*) V* (Thm. 1).

    A + P Pᵀ with P_n = √(n + 1/2) is −I/2 plus a skew-symmetric matrix, so it is
    unitarily diagonalisable: Λ = −1/2 + i·eig, V unitary.

    Returns:
      (Λ [n] complex, P̃ = V* P [n] complex, B̃ = V* B [n] complex, V [n, n] complex), modes
      sorted by the imaginary part of Λ (descending), so conjugate pairs are split evenly.
    """
    a, b = hippo_legs(n)
    p = np.sqrt(np.arange(n) + 0.5)
    s = a + np.outer(p, p)
    skew = (s - s.T) / 2.0
    evals, v = np.linalg.eigh(-1j * skew)  # skew = i · (Hermitian −i·skew)
    lam = np.diag(s).mean() + 1j * evals  # the diagonal of S is −1/2
    order = np.argsort(-lam.imag, kind="stable")
    lam, v = lam[order], v[:, order]
    return lam, v.conj().T @ p, v.conj().T @ b, v


def s4_init(channels: int, state_size: int, *, dt_min=1e-3, dt_max=1e-1, seed: int = 0):
    """S4 parameters for ``channels`` channels, HiPPO-LegS, half the modes (conjugate pairs).

    Returns a dict of numpy arrays: lam, p, b [H, M] complex64 (M = state_size / 2, copied
    per channel), c_tilde [H, M] complex64 (random normal), log_dt [H] float32 (log-uniform in
    [dt_min, dt_max]), d [H] float32 (ones).
    """
    if state_size < 2 or state_size % 2:
        raise ValueError(f"state_size={state_size} must be even and >= 2 (conjugate pairs)")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max; got {dt_min=}, {dt_max=}")
    lam, p, b, _ = hippo_dplr(state_size)
    m = state_size // 2
    rng = np.random.default_rng(seed)
    tile = lambda x: np.tile(x[:m][None], (channels, 1)).astype(np.complex64)  # noqa: E731
    c = rng.standard_normal((channels, m, 2)) * np.sqrt(0.5)
    log_dt = rng.uniform(np.log(dt_min), np.log(dt_max), channels)
    return dict(
        lam=tile(lam),
        p=tile(p),
        b=tile(b),
        c_tilde=(c[..., 0] + 1j * c[..., 1]).astype(np.complex64),
        log_dt=log_dt.astype(np.float32),
        d=np.ones(channels, np.float32),
    )


def _check(lam, p, b, c, log_dt):
    if lam.ndim != 2 or any(x.shape != lam.shape for x in (p, b, c)):
        raise ValueError(
            f"lam, p, b, c_tilde must all be [H, M]; got {lam.shape}, {p.shape}, {b.shape}, "
            f"{c.shape}"
        )
    if log_dt.shape != lam.shape[:1]:
        raise ValueError(f"log_dt must be [H] = {lam.shape[:1]}; got {log_dt.shape}")


def s4_kernel(lam, p, b, c_tilde, log_dt, length: int):
    """K̄ [H, L] float32: the S4 convolution kernel through the Cauchy / Woodbury route.

    Args:
      lam, p, b, c_tilde: [H, M] complex (Λ, P, B, C̃ = C (I − Ā^L)); log_dt: [H] (Δ = exp).
      length: L (>= 1); C̃ is tied to it.
    """
    lam, p, b, c = (jnp.asarray(x, jnp.complex64) for x in (lam, p, b, c_tilde))
    log_dt = jnp.asarray(log_dt, jnp.float32)
    _check(lam, p, b, c, log_dt)
    if length < 1:
        raise ValueError(f"length={length} must be >= 1")
    dt_H1 = jnp.exp(log_dt)[:, None]
    omega_L = jnp.exp(-2j * jnp.pi * jnp.arange(length) / length).astype(jnp.complex64)
    a_HL = jnp.broadcast_to(1.0 - omega_L, (lam.shape[0], length))
    b_HL = dt_H1 * (1.0 + omega_L) / 2.0  # a, b: ω = −1 gives b = 0, never 2 / (1 + ω)
    inv_HLM = 1.0 / (a_HL[..., None] - b_HL[..., None] * lam[:, None, :])  # Cauchy denominators

    def cauchy(x_HM, y_HM):  # k_XY(ω) = Σ_n X_n Y_n / (a − b Λ_n)
        return jnp.einsum("hm,hlm->hl", x_HM * y_HM, inv_HLM)

    pc = jnp.conj(p)
    k_cb, k_cp, k_pb, k_pp = cauchy(c, b), cauchy(c, p), cauchy(pc, b), cauchy(pc, p)
    k_hat = dt_H1 * (k_cb - b_HL * k_cp * k_pb / (1.0 + b_HL * k_pp))
    return 2.0 * jnp.real(jnp.fft.ifft(k_hat, axis=-1)).astype(jnp.float32)


def s4_convolve(u_BTH, kernel_HL, d_H):
    """y = K̄ * u + D u, causal, by FFT of length 2T: u [B, T, H], K̄ [H, >= T] -> [B, T, H]."""
    t = u_BTH.shape[1]
    if kernel_HL.shape[1] < t or kernel_HL.shape[0] != u_BTH.shape[2]:
        raise ValueError(
            f"kernel must be [H, >= T] = [{u_BTH.shape[2]}, {t}]; got {kernel_HL.shape}"
        )
    u = jnp.asarray(u_BTH, jnp.float32)
    uf = jnp.fft.rfft(u, n=2 * t, axis=1)
    kf = jnp.fft.rfft(kernel_HL[:, :t].T, n=2 * t, axis=0)
    y = jnp.fft.irfft(uf * kf[None], n=2 * t, axis=1)[:, :t]
    return y + u * jnp.asarray(d_H, jnp.float32)


def s4_recurrence(lam, p, b, c_tilde, log_dt, length: int):
    """The discrete SSM for stepping: (Ā [H, M, M], B̄ [H, M], C [H, M]), complex64.

    Ā, B̄ by the bilinear transform of A = Λ − P P*; C = C̃ (I − Ā^L)⁻¹ undoes the kernel's
    C̃ = C (I − Ā^L) for the same L.
    """
    lam, p, b, c = (jnp.asarray(x, jnp.complex64) for x in (lam, p, b, c_tilde))
    log_dt = jnp.asarray(log_dt, jnp.float32)
    _check(lam, p, b, c, log_dt)
    m = lam.shape[1]
    eye = jnp.eye(m, dtype=jnp.complex64)
    a_HMM = jax.vmap(jnp.diag)(lam) - p[:, :, None] * jnp.conj(p)[:, None, :]
    half = (jnp.exp(log_dt) / 2.0)[:, None, None].astype(jnp.complex64)
    back = eye - half * a_HMM  # I − Δ/2 A
    a_bar = jnp.linalg.solve(back, eye + half * a_HMM)
    b_bar = jnp.linalg.solve(back, (2.0 * half[..., 0] * b)[..., None])[..., 0]
    a_pow = jax.vmap(lambda x: jnp.linalg.matrix_power(x, length))(a_bar)
    # row vector C: C (I − Ā^L) = C̃  <=>  (I − Ā^L)ᵀ Cᵀ = C̃ᵀ
    c_rec = jnp.linalg.solve(jnp.swapaxes(eye - a_pow, -1, -2), c[..., None])[..., 0]
    return a_bar, b_bar, c_rec


def s4_scan(u_BTH, a_bar, b_bar, c, d_H, state_BHM=None):
    """The recurrent form, token by token: x_k = Ā x_{k−1} + B̄ u_k, y_k = 2 Re(C x_k) + D u_k.

    Args:
      u_BTH: [B, T, H]; a_bar [H, M, M], b_bar, c [H, M] from :func:`s4_recurrence`; d_H [H].
      state_BHM: complex state before step 0 (zeros if None).

    Returns:
      (y_BTH float32, final state [B, H, M] complex64).
    """
    u = jnp.asarray(u_BTH, jnp.float32)
    bsz, _, h = u.shape
    if state_BHM is None:
        state_BHM = jnp.zeros((bsz, h, a_bar.shape[1]), jnp.complex64)

    def step(x_BHM, u_BH):
        x_BHM = jnp.einsum("hmn,bhn->bhm", a_bar, x_BHM) + b_bar * u_BH[..., None]
        y_BH = 2.0 * jnp.real(jnp.einsum("hm,bhm->bh", c, x_BHM)) + d_H * u_BH
        return x_BHM, y_BH

    state, y_TBH = jax.lax.scan(step, state_BHM, jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(y_TBH, 0, 1), state
