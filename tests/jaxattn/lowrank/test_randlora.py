"""RandLoRA (PAPERS.md §7): the stated form, PEFT's definition, rank > r / full rank, key
reproducibility, gradients on the diagonals only."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam, Linear
from jaxattn.lowrank.methods.randlora import RandLoRAConfig


# built, attached, called and differentiated in compiled programs (eagerly, every op
# compiles; a jitted init has the eager init's values); draws are numpy (no per-shape compiles)
@nnx.jit(static_argnums=(0, 1, 2))
def _model(in_shape=(6,), out_shape=(10,), n=1):
    axes = (None,) * (len(in_shape) + len(out_shape))
    return nnx.List([Linear(in_shape, out_shape, axes=axes, rngs=nnx.Rngs(i)) for i in range(n)])


def _attach(model, cfg):
    nnx.jit(lambda m: (lr.attach(m, ".*", lambda p, lin: cfg.build(p, lin, rngs=nnx.Rngs(0))),
                       None)[1])(model)  # fmt: skip


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _randomize(ad, seed=1):
    ad.lam[...] = _normal(ad.lam.shape, seed)
    ad.gamma[...] = _normal(ad.gamma.shape, seed + 100)


_dk = nnx.jit(lambda ad: ad.delta_kernel(None))
_bases = nnx.jit(lambda ad: ad.bases())
_call = nnx.jit(lambda lin, x: lin(x))


def _peft_delta_weight(a, b, lam, gamma, d_in, d_out, scaling):
    """numpy transcription of PEFT 0.21.2 RandLoraLayer.get_scaled_bases + get_delta_weight:
    A [r, 1, d_min], B [d_max, n, r]; returns ΔW [d_out, d_in]."""
    r, n = lam.shape
    d_min, d_max = min(d_in, d_out), max(d_in, d_out)
    sliced_a = a[:, None, :d_min]
    sliced_b = b[:d_max, :n, :]
    update_b = sliced_b.reshape(d_max, -1)  # flatten(start_dim=1)
    # flatten(end_dim=1):
    update_a = (lam[:, :, None] * sliced_a * gamma[None]).reshape(r * n, d_min)
    if d_min == d_in:
        ub, ua = update_a, update_b
    else:
        ub, ua = update_b.T, update_a.T
    return (ub.T @ ua.T).T * scaling


def test_zero_lambda_is_base_exactly():
    model = _model()
    x = _normal((3, 6), 0)
    y0 = _call(model[0], x)
    _attach(model, RandLoRAConfig(rank=2, alpha=40.0))
    np.testing.assert_array_equal(np.asarray(_call(model[0], x)), np.asarray(y0))


_CASES = [((6,), (10,), 4), ((10,), (6,), 4), ((2, 4), (3, 3), 3), ((5,), (5,), 2)]


@pytest.mark.parametrize("in_shape,out_shape,r", _CASES)
def test_stated_form_peft_and_merge(in_shape, out_shape, r):
    model = _model(in_shape, out_shape)
    _attach(model, RandLoRAConfig(rank=r, alpha=7.0))
    ad = model[0].adapter
    _randomize(ad)
    d_in, d_out = math.prod(in_shape), math.prod(out_shape)
    n = math.ceil(min(d_in, d_out) / r)
    assert ad.lam.shape == (r, n) and ad.gamma.shape == (n, min(d_in, d_out))
    a, b = (np.asarray(t) for t in _bases(ad))
    lam, gamma = np.asarray(ad.lam[...]), np.asarray(ad.gamma[...])
    dk = np.asarray(_dk(ad)).reshape(d_in, d_out)
    want = _peft_delta_weight(a, b, lam, gamma, d_in, d_out, 7.0 / r)
    np.testing.assert_allclose(dk.T, want, rtol=1e-4, atol=1e-4)
    # ΔW = s·Σᵢ Bᵢ Λᵢ A Γᵢ on the (d_max, d_min) orientation
    bm = b.reshape(b.shape[0], r, n)
    m = sum(bm[:, :, i] @ np.diag(lam[:, i]) @ a @ np.diag(gamma[i]) for i in range(n))
    m = (7.0 / r) * m
    np.testing.assert_allclose(dk, m.T if d_in <= d_out else m, rtol=1e-4, atol=1e-4)
    x = _normal((4,) + in_shape, 2)
    kernel = np.asarray(nnx.jit(lambda lin: lin.effective_kernel())(model[0]))
    merged = np.tensordot(np.asarray(x), kernel, len(in_shape))
    np.testing.assert_allclose(np.asarray(_call(model[0], x)), merged, rtol=1e-4, atol=1e-4)


def test_rank_exceeds_r_and_is_full():
    model = _model((12,), (16,))
    _attach(model, RandLoRAConfig(rank=3))  # n = 4 bases, n·r = 12 = d_min
    ad = model[0].adapter
    ad.lam[...] = _normal(ad.lam.shape, 0)
    # with γ still at its constant init, A is shared: ΔW = (Σᵢ Bᵢ Λᵢ) A γ₀ has rank r
    assert np.linalg.matrix_rank(np.asarray(_dk(ad)), tol=1e-4) == 3
    ad.gamma[...] = _normal(ad.gamma.shape, 1)
    assert np.linalg.matrix_rank(np.asarray(_dk(ad)), tol=1e-4) == 12
    # one basis alone is rank r: keep only basis 0
    lam = np.array(ad.lam[...])
    lam[:, 1:] = 0.0
    ad.lam[...] = jnp.asarray(lam)
    assert np.linalg.matrix_rank(np.asarray(_dk(ad)), tol=1e-4) == 3
    # too few bases for the dimension (n·r < d): rank n·r < d
    small = _model((12,), (16,))
    _attach(small, RandLoRAConfig(rank=5))  # n = ceil(12 / 5) = 3 bases
    sm = small[0].adapter
    _randomize(sm)
    lam = np.array(sm.lam[...])
    lam[:, 2:] = 0.0  # two bases: rank 10
    sm.lam[...] = jnp.asarray(lam)
    assert np.linalg.matrix_rank(np.asarray(_dk(sm)), tol=1e-4) == 10


def test_bases_reproducible_and_not_state():
    m1, m2 = _model(n=2), _model(n=2)
    cfg = RandLoRAConfig(rank=2, seed=5)
    _attach(m1, cfg)
    _attach(m2, cfg)
    for t1, t2 in zip(_bases(m1[0].adapter), _bases(m2[0].adapter), strict=True):
        np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))
    assert not np.allclose(_bases(m1[0].adapter)[0], _bases(m1[1].adapter)[0])
    other = _model()
    _attach(other, RandLoRAConfig(rank=2, seed=6))
    assert not np.allclose(_bases(m1[0].adapter)[0], _bases(other[0].adapter)[0])
    n_state = sum(v.size for v in jax.tree.leaves(nnx.state(m1[0].adapter)))
    assert n_state == 2 * 3 + 3 * 6  # λ [r, n] + γ [n, d_min] only


def test_only_diagonals_get_gradients():
    model = _model()
    _attach(model, RandLoRAConfig(rank=2))
    _randomize(model[0].adapter)
    x = _normal((3, 6), 0)
    grad = nnx.grad(lambda m: jnp.sum(m[0](x) ** 2), argnums=nnx.DiffState(0, AdapterParam))
    grads = nnx.jit(grad)(model)
    g = nnx.to_pure_dict(grads)
    assert set(g[0]) == {"adapter"} and set(g[0]["adapter"]) == {"lam", "gamma"}
    assert all(float(jnp.abs(v).sum()) > 0 for v in jax.tree.leaves(g))


def test_validation_and_dtype():
    lin = _model()[0]
    with pytest.raises(ValueError, match=r"rank=7.*'l/q'"):
        RandLoRAConfig(rank=7).validate("l/q", lin)
    model = _model()
    _attach(model, RandLoRAConfig(rank=2))
    y = nnx.jit(lambda ad: ad.delta(jnp.ones((2, 6), jnp.bfloat16), None, base=None))(
        model[0].adapter
    )
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 10)
