"""S4 (jaxattn.ops.s4) against the paper's equations in numpy (complex128).

* HiPPO-LegS is normal plus low rank: V (diag Λ − P̃ P̃*) V* == A (Thm. 1), Re Λ = −1/2;
* bilinear discretisation: Ā = (I − Δ/2 A)⁻¹ (I + Δ/2 A), B̄ = (I − Δ/2 A)⁻¹ Δ B (Eq. 3)
  for A = Λ − P P*, and C = C̃ (I − Ā^L)⁻¹;
* the Cauchy / Woodbury kernel (with a = 1 − ω, b = Δ(1 + ω)/2, finite at ω = −1 for even
  L) == the explicit K̄_j = 2 Re(C Ā^j B̄), j < L;
* convolution mode (FFT) == recurrent mode x_k = Ā x_{k−1} + B̄ u_k, y_k = 2 Re(C x_k) + D u_k
  stepped token by token (fp32), and == the direct sum y_t = Σ_j K̄_j u_{t−j} + D u_t;
* gradients of the convolution-mode output are finite; bad input names the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops.s4 import (
    hippo_dplr,
    hippo_legs,
    s4_convolve,
    s4_init,
    s4_kernel,
    s4_recurrence,
    s4_scan,
)

H, N, L, BATCH = 3, 8, 16, 2
KEYS = ("lam", "p", "b", "c_tilde", "log_dt")


@pytest.fixture(scope="module")
def params():
    return s4_init(H, N, dt_min=0.05, dt_max=0.2, seed=1)


def _np_discrete(prm, length):
    """Ā, B̄, C per channel in complex128, straight from Eq. 3 with dense inverses."""
    out = []
    for h in range(H):
        lam, p, b, ct = (np.asarray(prm[k][h], np.complex128) for k in KEYS[:4])
        dt = float(np.exp(np.float64(prm["log_dt"][h])))
        a = np.diag(lam) - np.outer(p, p.conj())
        eye = np.eye(len(lam))
        inv = np.linalg.inv(eye - dt / 2 * a)
        a_bar, b_bar = inv @ (eye + dt / 2 * a), inv @ (dt * b)
        c = ct @ np.linalg.inv(eye - np.linalg.matrix_power(a_bar, length))
        out.append((a_bar, b_bar, c))
    return out


def test_hippo_is_normal_plus_low_rank():
    a, b = hippo_legs(N)
    lam, p, bt, v = hippo_dplr(N)
    np.testing.assert_allclose(
        v @ (np.diag(lam) - np.outer(p, p.conj())) @ v.conj().T, a, atol=1e-10
    )
    np.testing.assert_allclose(v.conj().T @ b, bt, atol=1e-12)
    np.testing.assert_allclose(lam.real, -0.5, atol=1e-12)
    np.testing.assert_allclose(np.sort(lam[: N // 2].imag), np.sort(-lam[N // 2 :].imag), atol=1e-9)


def test_discretisation_is_bilinear(params):
    a_bar, b_bar, c = jax.jit(s4_recurrence, static_argnums=5)(*(params[k] for k in KEYS), L)
    for h, (ra, rb, rc) in enumerate(_np_discrete(params, L)):
        np.testing.assert_allclose(a_bar[h], ra, atol=2e-6)
        np.testing.assert_allclose(b_bar[h], rb, atol=2e-6)
        np.testing.assert_allclose(c[h], rc, rtol=1e-4, atol=1e-4)


def test_cauchy_kernel_equals_explicit_sum(params):
    k = jax.jit(s4_kernel, static_argnums=5)(*(params[k] for k in KEYS), L)
    ref = np.zeros((H, L))
    for h, (a_bar, b_bar, c) in enumerate(_np_discrete(params, L)):
        x = b_bar
        for j in range(L):  # K̄_j = 2 Re(C Ā^j B̄)
            ref[h, j] = 2 * np.real(c @ x)
            x = a_bar @ x
    assert np.all(np.isfinite(k))  # L even: ω = −1 is one of the nodes
    np.testing.assert_allclose(k, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_conv_mode_equals_recurrent_mode(params):
    u = np.random.default_rng(2).standard_normal((BATCH, L, H)).astype(np.float32)

    @jax.jit
    def both(prm, u):
        kern = s4_kernel(*(prm[k] for k in KEYS), L)
        y_conv = s4_convolve(u, kern, prm["d"])
        y_rec, _ = s4_scan(u, *s4_recurrence(*(prm[k] for k in KEYS), L), prm["d"])
        return kern, y_conv, y_rec

    kern, y_conv, y_rec = both(params, u)
    scale = np.abs(y_rec).max()
    np.testing.assert_allclose(y_conv, y_rec, atol=2e-5 * scale, rtol=1e-4)
    kern = np.asarray(kern, np.float64)
    direct = (
        np.stack([sum(kern[:, j] * u[:, t - j] for j in range(t + 1)) for t in range(L)], axis=1)
        + u * params["d"]
    )
    np.testing.assert_allclose(y_conv, direct, atol=2e-5 * scale, rtol=1e-4)


def test_gradients_finite(params):
    u = np.random.default_rng(3).standard_normal((1, L, H)).astype(np.float32)

    def loss(prm):
        kern = s4_kernel(*(prm[k] for k in KEYS), L)
        return jnp.sum(jnp.sin(s4_convolve(u, kern, prm["d"])))

    grads = jax.jit(jax.grad(loss))(params)
    for name, g in grads.items():
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0), name


def test_bad_input(params):
    with pytest.raises(ValueError, match="state_size"):
        s4_init(H, 7)
    with pytest.raises(ValueError, match="log_dt"):
        s4_kernel(*(params[k] for k in KEYS[:4]), params["log_dt"][:2], L)
    with pytest.raises(ValueError, match="lam, p, b, c_tilde"):
        s4_kernel(
            params["lam"], params["p"][:, :1], params["b"], params["c_tilde"], params["log_dt"], L
        )
    with pytest.raises(ValueError, match="kernel"):
        s4_convolve(np.zeros((1, L, H), np.float32), np.zeros((H, L - 1), np.float32), params["d"])
