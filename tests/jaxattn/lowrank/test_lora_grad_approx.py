"""Chained low-rank LoRA gradient (Hu et al. 2024): at full approximation rank the chain
(G = c·Vᵀ, p = f⊙G − diag((f⊙G)·1)·f, ∂W = xᵀ·p·K ...) equals jax.grad of the loss for
partial (Q, V) and full (Q, K, V) adaptation; the error falls with the SVD rank; the Taylor
(polynomial-method) version is accurate for small logits and drifts for large ones; the
custom_vjp loss has the exact value and the approximate gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.lowrank import lora_grad_approx as lga

L, D, H, R = 8, 4, 3, 2


def _problem(targets, x_scale=1.0):
    ks = iter(jax.random.split(jax.random.key(0), 16))
    x = x_scale * jax.random.normal(next(ks), (L, D)) / np.sqrt(D)
    w = {t: jax.random.normal(next(ks), (D, H)) / np.sqrt(D) for t in lga.TARGETS}
    fac = {
        t: (jax.random.normal(next(ks), (D, R)) * 0.3, jax.random.normal(next(ks), (R, H)) * 0.3)
        for t in targets
    }
    y = jax.random.normal(next(ks), (L, H))
    return fac, x, w, y


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v")], ids=["partial", "full"])
def test_exact_at_full_rank_and_shapes(targets):
    fac, x, w, y = _problem(targets)
    approx = lga.ChainedApprox(kind="svd", rank=L)
    got = lga.approx_lora_grads(fac, x, w, y, approx)
    exact = jax.grad(lga.lora_attention_loss)(fac, x, w, y)
    assert set(got) == set(targets)
    for t in targets:
        for j in range(2):
            assert got[t][j].shape == fac[t][j].shape
            np.testing.assert_allclose(got[t][j], exact[t][j], rtol=2e-4, atol=2e-5)
    assert lga.gradient_error(fac, x, w, y, approx)["total"] < 1e-4


def test_svd_error_falls_with_rank():
    fac, x, w, y = _problem(("q", "v"), x_scale=3.0)
    errs = [lga.gradient_error(fac, x, w, y, lga.ChainedApprox(rank=k))["total"]
            for k in (1, 2, 4, 6, L)]  # fmt: skip
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[0] > 1e-2 and errs[-1] < 1e-4


def test_taylor_accurate_below_norm_threshold_and_drifts_above():
    small = _problem(("q", "v"), x_scale=0.5)
    errs = [lga.gradient_error(*small, lga.ChainedApprox(kind="taylor", degree=g))["total"]
            for g in (0, 1, 2, 3)]  # fmt: skip
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3
    big = _problem(("q", "v"), x_scale=6.0)
    e_big = lga.gradient_error(*big, lga.ChainedApprox(kind="taylor", degree=3))["total"]
    assert e_big > 100 * errs[-1], (e_big, errs)


def test_custom_vjp_value_exact_gradient_approximate():
    fac, x, w, y = _problem(("q", "v"), x_scale=3.0)
    approx = lga.ChainedApprox(kind="svd", rank=2)
    val, g = jax.value_and_grad(lga.approx_lora_loss)(fac, x, w, y, approx)
    np.testing.assert_allclose(val, lga.lora_attention_loss(fac, x, w, y), rtol=1e-6)
    want = lga.approx_lora_grads(fac, x, w, y, approx)
    for t in fac:
        for j in range(2):
            np.testing.assert_allclose(g[t][j], want[t][j], rtol=1e-5, atol=1e-7)


def test_validation():
    with pytest.raises(ValueError, match="kind"):
        lga.ChainedApprox(kind="fft")
    with pytest.raises(ValueError, match="rank"):
        lga.ChainedApprox(rank=0)
    fac, x, w, y = _problem(("q", "v"))
    with pytest.raises(ValueError, match="factors"):
        lga.approx_lora_grads({"v": fac["v"]}, x, w, y, lga.ChainedApprox())
    with pytest.raises(ValueError, match="y must"):
        lga.approx_lora_grads(fac, x, w, jnp.ones((L, H + 1)), lga.ChainedApprox())
