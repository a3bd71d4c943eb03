"""Hydra (PAPERS.md §7): zero-init no-op, merged == unmerged, adapter-only gradients, count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam, Linear
from jaxattn.lowrank.methods.hydra import HydraConfig


# built, attached, called and differentiated in compiled programs (eagerly, every op
# compiles; a jitted init has the eager init's values); draws are numpy (no per-shape compiles)
@nnx.jit(static_argnums=(0, 1))
def _build(in_shape, out_shape):
    axes = ("embed",) * len(in_shape) + ("heads", "head_dim")[: len(out_shape)]
    return nnx.List([Linear(in_shape, out_shape, axes=axes, rngs=nnx.Rngs(1))])


def _model(in_shape=(6,), out_shape=(2, 5)):
    model = _build(in_shape, out_shape)
    return model, model[0]


def _attach(model, cfg):
    nnx.jit(lambda m: (lr.attach(m, ".*", lambda p, lin: cfg.build(p, lin, rngs=nnx.Rngs(0))),
                       None)[1])(model)  # fmt: skip


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _randomize_up(lin, seed=3):
    ad = lin.adapter
    ad.b_p[...] = _normal(ad.b_p.shape, seed)
    ad.b_s[...] = _normal(ad.b_s.shape, seed + 100)


_call = nnx.jit(lambda lin, x: lin(x))


def test_registered():
    assert "hydra" in lr.registered_methods()
    assert lr.make_method("hydra", rank=2) == HydraConfig(rank=2)


def test_zero_init_is_base_exactly():
    model, lin = _model()
    x = _normal((3, 6), 0)
    y0 = _call(lin, x)
    _attach(model, HydraConfig(rank=2, seq_rank=3))
    np.testing.assert_array_equal(np.asarray(_call(lin, x)), np.asarray(y0))


@pytest.mark.parametrize("in_shape,out_shape", [((6,), (2, 5)), ((2, 3), (4,))])
def test_merged_equals_unmerged_and_formula(in_shape, out_shape):
    model, lin = _model(in_shape, out_shape)
    _attach(model, HydraConfig(rank=2, alpha=3.0, seq_rank=3, seq_alpha=1.5))
    _randomize_up(lin)
    ad = lin.adapter
    x = _normal((4,) + in_shape, 5)
    kernel = np.asarray(nnx.jit(lambda lin: lin.effective_kernel())(lin))
    merged = np.tensordot(np.asarray(x), kernel, len(in_shape))
    np.testing.assert_allclose(np.asarray(_call(lin, x)), merged, rtol=1e-5, atol=1e-5)
    # the paper's form as matrices: ΔW = s_p B_P A_P + s_s W0 B_S A_S (W0 = Kᵀ, [out, in])
    d_in, d_out = lin.fan_in, lin.fan_out
    w0 = np.asarray(lin.base_kernel()).reshape(d_in, d_out).T
    A_p = np.asarray(ad.a_p[...]).reshape(d_in, -1).T
    B_p = np.asarray(ad.b_p[...]).reshape(-1, d_out).T
    A_s = np.asarray(ad.a_s[...]).reshape(d_in, -1).T
    B_s = np.asarray(ad.b_s[...]).reshape(-1, d_in).T
    dW = 1.5 * B_p @ A_p + 0.5 * w0 @ B_s @ A_s
    got = np.asarray(nnx.jit(lambda lin: lin.adapter.delta_kernel(lin.base_kernel()))(lin))
    got = got.reshape(d_in, d_out).T
    np.testing.assert_allclose(got, dW, rtol=1e-5, atol=1e-6)


def test_only_adapter_params_get_gradients():
    model, lin = _model()
    _attach(model, HydraConfig(rank=2))
    _randomize_up(lin)
    x = _normal((3, 6), 0)

    def loss(m):
        return jnp.sum(m[0](x) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam)))(model)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
    names = sorted(jax.tree_util.keystr(p) for p, _ in leaves)
    assert len(names) == 4 and all("adapter" in n for n in names)
    assert all(float(jnp.abs(g).sum()) > 0 for _, g in leaves)
    kernel_params = nnx.state(model, nnx.Param)
    n_base = sum(v.size for v in jax.tree.leaves(kernel_params)) - sum(
        v.size for v in jax.tree.leaves(nnx.state(model, AdapterParam))
    )
    assert n_base == lin.kernel.size


@pytest.mark.parametrize("r,rs", [(1, 1), (2, 5), (4, 6)])
def test_parameter_count(r, rs):
    model, lin = _model()
    _attach(model, HydraConfig(rank=r, seq_rank=rs))
    n = sum(v.size for v in jax.tree.leaves(nnx.state(model, AdapterParam)))
    assert n == r * (6 + 10) + 2 * rs * 6


def test_rank_bounds():
    _, lin = _model()
    with pytest.raises(ValueError, match=r"rank=7.*'q'"):
        HydraConfig(rank=7).validate("q", lin)
    with pytest.raises(ValueError, match=r"seq_rank=7.*'q'"):
        HydraConfig(rank=2, seq_rank=7).validate("q", lin)
    with pytest.raises(ValueError, match="rank=0"):
        HydraConfig(rank=0).build("q", lin, rngs=nnx.Rngs(0))


def test_delta_in_input_dtype():
    model, lin = _model()
    _attach(model, HydraConfig(rank=2))
    x = jnp.ones((2, 6), jnp.bfloat16)
    assert lin.adapter.delta(x, None, base=lin.base_kernel(jnp.bfloat16)).dtype == jnp.bfloat16
    assert lin.adapter.a_p[...].dtype == jnp.float32
