"""SST (Zhao et al. 2024) against the paper's own update equations: the sampling distribution
(§4.4), the enhanced gradient of U, V (§4.2, Appendix D), the unit-length re-normalisation of
the updated vectors and the clamp ``Σ ← max(Σ, 0)`` (Algorithm 1, Appendix A), and the
periodic re-SVD keeping W under those defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattn import optim

M, N, K, R, LR = 6, 5, 5, 2, 0.1
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(8, M)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(8, N)), jnp.float32)


def _params():
    u, s, vt = np.linalg.svd(RNG.normal(size=(M, N)), full_matrices=False)
    return {"u": jnp.asarray(u, jnp.float32), "s": jnp.asarray(s, jnp.float32),
            "vt": jnp.asarray(vt, jnp.float32)}  # fmt: skip


def _loss_w(w):
    return jnp.sum((X @ w - Y) ** 2)


def _loss(p):
    return _loss_w((p["u"] * p["s"]) @ p["vt"])


@pytest.fixture(scope="module")
def setup():
    params = _params()
    grads = jax.grad(_loss)(params)
    g_mn = jax.grad(_loss_w)((params["u"] * params["s"]) @ params["vt"])  # ∂L/∂W
    return params, grads, np.asarray(g_mn)


def _step(params, grads, **kw):
    tx = optim.sst(optax.sgd(LR), rank=R, every=1, **kw)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in new.items()}, np.asarray(state.index[0])


def test_sampling_frequencies_follow_the_papers_mixture():
    """§4.4: index i is drawn with p(i) = ½ (1/k + Σ_i / Σ_j Σ_j) (first draw of a
    multinomial without replacement); 20000 seeded draws, 4σ tolerance. Zero singular values
    keep the uniform share (the plain |s| weighting would never draw them)."""
    s = jnp.asarray([8.0, 4.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.25])
    p = 0.5 * (1 / 8 + np.asarray(s) / float(jnp.sum(s)))
    np.testing.assert_allclose(optim.sampling_probabilities(s), p, rtol=1e-6)
    keys = jax.random.split(jax.random.key(1), 20000)
    draws = jax.jit(jax.vmap(lambda k: optim.sample_vectors(k, s, 1)))(keys)[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=8) / 20000
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / 20000).max())
    assert freq[5] > 0.04 and freq[6] > 0.04  # 1/16 each, not 0
    idx = np.asarray(optim.sample_vectors(jax.random.key(2), s, 5))
    assert len(set(idx.tolist())) == 5  # without replacement
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="uniform_mix"):
            optim.sst(optax.sgd(LR), rank=R, every=1, uniform_mix=bad)
    with pytest.raises(ValueError, match="enhanced_grad"):
        optim.sst(optax.sgd(LR), rank=R, every=1, enhanced_grad=1)


def test_enhanced_gradient_normalisation_and_clamp_are_the_papers(setup):
    """§4.2 / Appendix D: the sampled vectors step along the enhanced gradient
    ∇̃U_·i = ∂L/∂W V_·i, ∇̃V_·i = (∂L/∂W)ᵀ U_·i (∂L/∂W from jax.grad of the dense loss), not
    autodiff's s_i-scaled one; Algorithm 1 then re-normalises them to unit length and updates
    all of Σ as max(Σ − η U_·iᵀ ∂L/∂W V_·i, 0). Unsampled vectors do not move."""
    params, grads, g = setup
    u, s, vt = (np.asarray(params[n]) for n in ("u", "s", "vt"))
    new, idx = _step(params, grads, normalize=False, clamp_s=False)
    want_u = u - LR * g @ vt.T  # U − η ∂L/∂W V
    want_vt = vt - LR * u.T @ g  # Vᵀ − η Uᵀ ∂L/∂W
    np.testing.assert_allclose(new["u"][:, idx], want_u[:, idx], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["vt"][idx], want_vt[idx], rtol=1e-5, atol=1e-6)
    rest = np.setdiff1d(np.arange(K), idx)
    np.testing.assert_array_equal(new["u"][:, rest], u[:, rest])
    want_s = s - LR * np.einsum("mk,mn,kn->k", u, g, vt)  # ∂L/∂Σ_i = U_·iᵀ ∂L/∂W V_·i
    np.testing.assert_allclose(new["s"], want_s, rtol=1e-5, atol=1e-6)
    plain, _ = _step(params, grads, enhanced_grad=False, normalize=False, clamp_s=False)
    autodiff_u = u - LR * (g @ vt.T) * s  # autodiff's ∂L/∂U = ∂L/∂W V diag(s)
    np.testing.assert_allclose(plain["u"][:, idx], autodiff_u[:, idx], rtol=1e-5, atol=1e-6)
    assert np.abs(plain["u"][:, idx] - new["u"][:, idx]).max() > 1e-3  # the two differ
    # the defaults: unit-length vectors after the step, and Σ clamped at 0
    paper, _ = _step(params, grads)
    unit = want_u[:, idx] / np.linalg.norm(want_u[:, idx], axis=0)
    np.testing.assert_allclose(paper["u"][:, idx], unit, rtol=1e-5, atol=1e-6)
    unit_v = want_vt[idx] / np.linalg.norm(want_vt[idx], axis=1, keepdims=True)
    np.testing.assert_allclose(paper["vt"][idx], unit_v, rtol=1e-5, atol=1e-6)
    big = {**grads, "s": jnp.asarray([1e3, -1.0, 1e3, -1.0, 0.0])}  # two pushed below 0
    clamped, _ = _step(params, big)
    np.testing.assert_allclose(clamped["s"], np.maximum(s - LR * np.asarray(big["s"]), 0))
    assert clamped["s"][0] == 0 and clamped["s"][2] == 0


def test_resvd_under_the_paper_defaults_keeps_w_and_orthonormalises(setup):
    """The re-SVD at the end of a round (svd_every) after paper-default steps: U'·diag(s')·V'ᵀ
    equals the merged weight of the same steps without re-SVD, U', V' orthonormal."""
    params, _, _ = setup
    grad = jax.jit(jax.grad(_loss))
    with_svd = optim.sst(optax.sgd(LR), rank=R, every=1, svd_every=4)
    without = optim.sst(optax.sgd(LR), rank=R, every=1, svd_every=400)
    step = jax.jit(lambda g, a, b, p: (with_svd.update(g, a, p), without.update(g, b, p)))
    sa, sb = with_svd.init(params), without.init(params)
    p = params
    for _ in range(4):
        g = grad(p)
        (ua, sa), (ub, sb) = step(g, sa, sb, p)
        p, drifted = optax.apply_updates(p, ua), optax.apply_updates(p, ub)
    merged = lambda q: np.asarray((q["u"] * q["s"]) @ q["vt"])  # noqa: E731
    np.testing.assert_allclose(merged(p), merged(drifted), atol=2e-5)
    u, vt = np.asarray(p["u"]), np.asarray(p["vt"])
    d_u = np.asarray(drifted["u"])
    assert np.abs(d_u.T @ d_u - np.eye(K)).max() > 1e-3  # the steps had broken orthogonality
    np.testing.assert_allclose(u.T @ u, np.eye(K), atol=1e-5)
    np.testing.assert_allclose(vt @ vt.T, np.eye(K), atol=1e-5)
