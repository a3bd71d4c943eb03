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
    grads, g_mn = jax.jit(
        lambda p: (jax.grad(_loss)(p), jax.grad(_loss_w)((p["u"] * p["s"]) @ p["vt"]))
    )(params)  # autodiff's gradients of the factors, ∂L/∂W
    return params, grads, np.asarray(g_mn)


CONFIGS = {  # one jitted program steps them all
    "enhanced": dict(normalize=False, clamp_s=False),
    "autodiff": dict(enhanced_grad=False, normalize=False, clamp_s=False),
    "paper": {},
}


@pytest.fixture(scope="module")
def stepped(setup):
    """One SGD step of each variant from the same params (and the paper's under a Σ gradient
    that pushes two singular values below 0); the sampled index, the same for all (seed 0)."""
    params, grads, _ = setup
    big = {**grads, "s": jnp.asarray([1e3, -1.0, 1e3, -1.0, 0.0])}
    txs = {n: optim.sst(optax.sgd(LR), rank=R, every=1, **kw) for n, kw in CONFIGS.items()}

    @jax.jit
    def run(grads, big):  # the inits and every update in one program
        states = {n: tx.init(params) for n, tx in txs.items()}
        out = {n: tx.update(grads, states[n], params)[0] for n, tx in txs.items()}
        out["clamped"] = txs["paper"].update(big, states["paper"], params)[0]
        new = {n: optax.apply_updates(params, u) for n, u in out.items()}
        return new, states["paper"].index[0]

    new, index = jax.tree.map(np.asarray, run(grads, big))
    return new, index, np.asarray(big["s"])


def test_sampling_frequencies_follow_the_papers_mixture():
    """§4.4: index i is drawn with p(i) = ½ (1/k + Σ_i / Σ_j Σ_j) (first draw of a
    multinomial without replacement); 20000 seeded draws, 4σ tolerance. Zero singular values
    keep the uniform share (the plain |s| weighting would never draw them)."""
    s = np.asarray([8.0, 4.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.25], np.float32)
    p = 0.5 * (1 / 8 + s / s.sum())

    @jax.jit
    def run(s):  # one program: the probabilities, 20000 single draws, one draw of 5
        keys = jax.random.split(jax.random.key(1), 20000)
        draws = jax.vmap(lambda k: optim.sample_vectors(k, s, 1))(keys)[:, 0]
        return optim.sampling_probabilities(s), draws, optim.sample_vectors(jax.random.key(2), s, 5)

    probs, draws, idx = (np.asarray(x) for x in run(s))
    np.testing.assert_allclose(probs, p, rtol=1e-6)
    freq = np.bincount(draws, minlength=8) / 20000
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / 20000).max())
    assert freq[5] > 0.04 and freq[6] > 0.04  # 1/16 each, not 0
    assert len(set(idx.tolist())) == 5  # without replacement
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="uniform_mix"):
            optim.sst(optax.sgd(LR), rank=R, every=1, uniform_mix=bad)
    with pytest.raises(ValueError, match="enhanced_grad"):
        optim.sst(optax.sgd(LR), rank=R, every=1, enhanced_grad=1)


def test_enhanced_gradient_normalisation_and_clamp_are_the_papers(setup, stepped):
    """§4.2 / Appendix D: the sampled vectors step along the enhanced gradient
    ∇̃U_·i = ∂L/∂W V_·i, ∇̃V_·i = (∂L/∂W)ᵀ U_·i (∂L/∂W from jax.grad of the dense loss), not
    autodiff's s_i-scaled one; Algorithm 1 then re-normalises them to unit length and updates
    all of Σ as max(Σ − η U_·iᵀ ∂L/∂W V_·i, 0). Unsampled vectors do not move."""
    params, _, g = setup
    steps, idx, big_s = stepped
    u, s, vt = (np.asarray(params[n]) for n in ("u", "s", "vt"))
    new = steps["enhanced"]
    want_u = u - LR * g @ vt.T  # U − η ∂L/∂W V
    want_vt = vt - LR * u.T @ g  # Vᵀ − η Uᵀ ∂L/∂W
    np.testing.assert_allclose(new["u"][:, idx], want_u[:, idx], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["vt"][idx], want_vt[idx], rtol=1e-5, atol=1e-6)
    rest = np.setdiff1d(np.arange(K), idx)
    np.testing.assert_array_equal(new["u"][:, rest], u[:, rest])
    want_s = s - LR * np.einsum("mk,mn,kn->k", u, g, vt)  # ∂L/∂Σ_i = U_·iᵀ ∂L/∂W V_·i
    np.testing.assert_allclose(new["s"], want_s, rtol=1e-5, atol=1e-6)
    plain = steps["autodiff"]
    autodiff_u = u - LR * (g @ vt.T) * s  # autodiff's ∂L/∂U = ∂L/∂W V diag(s)
    np.testing.assert_allclose(plain["u"][:, idx], autodiff_u[:, idx], rtol=1e-5, atol=1e-6)
    assert np.abs(plain["u"][:, idx] - new["u"][:, idx]).max() > 1e-3  # the two differ
    # the defaults: unit-length vectors after the step, and Σ clamped at 0
    paper = steps["paper"]
    unit = want_u[:, idx] / np.linalg.norm(want_u[:, idx], axis=0)
    np.testing.assert_allclose(paper["u"][:, idx], unit, rtol=1e-5, atol=1e-6)
    unit_v = want_vt[idx] / np.linalg.norm(want_vt[idx], axis=1, keepdims=True)
    np.testing.assert_allclose(paper["vt"][idx], unit_v, rtol=1e-5, atol=1e-6)
    clamped = steps["clamped"]  # a Σ gradient that pushes two singular values below 0
    np.testing.assert_allclose(clamped["s"], np.maximum(s - LR * big_s, 0), rtol=1e-6)
    assert clamped["s"][0] == 0 and clamped["s"][2] == 0


def test_resvd_under_the_paper_defaults_keeps_w_and_orthonormalises(setup):
    """Algorithm 1's periodic re-initialisation (§4.3: W is re-factorised by SVD every round)
    after paper-default steps: U'·diag(s')·V'ᵀ = U·diag(Σ)·Vᵀ, the merged weight of the same
    steps without re-SVD, and U', V' orthonormal again."""
    params, _, _ = setup
    with_svd = optim.sst(optax.sgd(LR), rank=R, every=1, svd_every=4)
    without = optim.sst(optax.sgd(LR), rank=R, every=1, svd_every=400)

    @jax.jit
    def step(a, b, p):
        g = jax.grad(_loss)(p)
        (ua, a), (ub, b) = with_svd.update(g, a, p), without.update(g, b, p)
        return a, b, optax.apply_updates(p, ua), optax.apply_updates(p, ub)

    sa, sb = jax.jit(lambda p: (with_svd.init(p), without.init(p)))(params)
    p = params
    for _ in range(4):
        sa, sb, p, drifted = step(sa, sb, p)
    merged = lambda q: np.asarray((q["u"] * q["s"]) @ q["vt"])  # noqa: E731
    np.testing.assert_allclose(merged(p), merged(drifted), atol=2e-5)
    u, vt = np.asarray(p["u"]), np.asarray(p["vt"])
    d_u = np.asarray(drifted["u"])
    assert np.abs(d_u.T @ d_u - np.eye(K)).max() > 1e-3  # the steps had broken orthogonality
    np.testing.assert_allclose(u.T @ u, np.eye(K), atol=1e-5)
    np.testing.assert_allclose(vt @ vt.T, np.eye(K), atol=1e-5)
