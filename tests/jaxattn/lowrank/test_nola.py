"""NOLA (PAPERS.md §7): β = 0 is the base, bases from the key, trainable = coefficients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam, Linear
from jaxattn.lowrank.methods.nola import NOLAConfig


# built, attached, called and differentiated in compiled programs (eagerly, every op
# compiles; a jitted init has the eager init's values); inputs are numpy draws
@nnx.jit(static_argnums=0)
def _model(n=1):
    lins = [Linear((6,), (2, 4), axes=("embed", "heads", "head_dim"), rngs=nnx.Rngs(i))
            for i in range(n)]  # fmt: skip
    return nnx.List(lins)


def _attach(model, cfg, seed=0):
    nnx.jit(lambda m: (lr.attach(m, ".*", lambda p, lin: cfg.build(p, lin, rngs=nnx.Rngs(seed))),
                       None)[1])(model)  # fmt: skip


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


_bases = nnx.jit(lambda ad: ad.bases())
_call = nnx.jit(lambda lin, x: lin(x))


def _n_adapter(model):
    return sum(v.size for v in jax.tree.leaves(nnx.state(model, AdapterParam)))


def test_beta_zero_is_base_exactly():
    model = _model()
    x = _normal((3, 6), 0)
    y0 = _call(model[0], x)
    _attach(model, NOLAConfig(rank=2, num_basis_a=5, num_basis_b=7))
    np.testing.assert_array_equal(np.asarray(_call(model[0], x)), np.asarray(y0))


@pytest.mark.parametrize("rank", [1, 2, 6])
def test_trainable_count_is_coefficients_only(rank):
    model = _model()
    _attach(model, NOLAConfig(rank=rank, num_basis_a=5, num_basis_b=7))
    assert _n_adapter(model) == 5 + 7
    # nothing else was added to the state: no stored bases
    assert sum(v.size for v in jax.tree.leaves(nnx.state(model))) == 6 * 8 + 12


def test_bases_regenerated_from_seed_and_path():
    m1, m2, m3 = _model(2), _model(2), _model(2)
    cfg = NOLAConfig(rank=2, num_basis_a=3, num_basis_b=4, seed=7)
    _attach(m1, cfg, seed=0)
    _attach(m2, cfg, seed=123)  # different coefficient init, same bases
    _attach(m3, NOLAConfig(rank=2, num_basis_a=3, num_basis_b=4, seed=8))
    a1, b1 = _bases(m1[0].adapter)
    a2, b2 = _bases(m2[0].adapter)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    np.testing.assert_array_equal(np.asarray(b1), np.asarray(b2))
    assert a1.shape == (3, 6, 2) and b1.shape == (4, 2, 2, 4)
    assert not np.allclose(a1, _bases(m3[0].adapter)[0])  # another seed
    assert not np.allclose(a1, _bases(m1[1].adapter)[0])  # another path


def test_formula_merge_and_gradients():
    model = _model()
    _attach(model, NOLAConfig(rank=2, num_basis_a=3, num_basis_b=4, alpha=4.0))
    ad = model[0].adapter
    ad.coef_b[...] = jnp.asarray(np.array([0.5, -1.0, 2.0, 0.25], np.float32))
    a_bases, b_bases = (np.asarray(t) for t in _bases(ad))
    coef_a, coef_b = np.asarray(ad.coef_a[...]), np.asarray(ad.coef_b[...])
    a = sum(coef_a[i] * a_bases[i] for i in range(3))
    b = sum(coef_b[j] * b_bases[j] for j in range(4))
    want = 2.0 * np.einsum("ir,rhd->ihd", a, b)
    dk = nnx.jit(lambda ad: ad.delta_kernel(None))(ad)
    np.testing.assert_allclose(np.asarray(dk), want, rtol=1e-5, atol=1e-6)
    x = _normal((5, 6), 1)
    kernel = np.asarray(nnx.jit(lambda lin: lin.effective_kernel())(model[0]))
    merged = np.tensordot(np.asarray(x), kernel, 1)
    np.testing.assert_allclose(np.asarray(_call(model[0], x)), merged, rtol=1e-5, atol=1e-6)

    grad = nnx.grad(lambda m: jnp.sum(m[0](x) ** 2), argnums=nnx.DiffState(0, AdapterParam))
    grads = nnx.jit(grad)(model)
    g = nnx.to_pure_dict(grads)[0]["adapter"]
    assert set(g) == {"coef_a", "coef_b"}
    assert float(jnp.abs(g["coef_a"]).sum()) > 0 and float(jnp.abs(g["coef_b"]).sum()) > 0


def test_validation():
    lin = _model()[0]
    with pytest.raises(ValueError, match=r"rank=7.*'x/q'"):
        NOLAConfig(rank=7).validate("x/q", lin)
    with pytest.raises(ValueError, match="num_basis_b=0"):
        NOLAConfig(rank=2, num_basis_b=0).validate("x/q", lin)


def test_jit_and_dtype():
    model = _model()
    _attach(model, NOLAConfig(rank=2, num_basis_a=3, num_basis_b=4))
    model[0].adapter.coef_b[...] = jnp.ones((4,))
    x = jnp.ones((2, 6), jnp.bfloat16)
    y = nnx.jit(lambda m, x: m[0].adapter.delta(x, None, base=None))(model, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(model[0].adapter.delta(x.astype(jnp.float32), None, base=None)),
        rtol=3e-2, atol=3e-2,
    )  # fmt: skip
