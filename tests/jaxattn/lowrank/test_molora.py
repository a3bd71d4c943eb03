"""Phi-4 Mixture-of-LoRAs (``molora``) on one Linear (the DecoderLM no-op / merge check is in
test_seed_methods_model.py): tag routing equals each sequence alone through its own
(merged) LoRA, tag -1 everywhere is the base bit for bit, a one-hot (top-1) router gives the
chosen LoRA's delta per token, and gradients reach only the adapters picked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam, Linear
from jaxattn.layers._context import Context


def _normal(shape, seed):
    """fp32 N(0, 1) draws from numpy (no per-shape device compiles)."""
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


@nnx.jit
def _tagged(lin, x, ids):
    """``lin(x)`` routed by the tags ``ids`` (None: no context), in one compiled program."""
    ctx = None if ids is None else Context.create(*x.shape[:2], sequence_ids_B=ids)
    return lin(x, ctx)


def test_tag_routing_is_each_sequence_with_its_merged_lora():
    lin, ad = _lin_and_adapter("tag", n=3)
    x = jnp.asarray(_normal((3, 4, 6), 5))
    base = np.asarray(_tagged(lin, x, None))
    lin.adapter = ad
    ids = np.array([0, 2, -1], np.int32)
    mixed = np.asarray(_tagged(lin, x, ids))
    off = np.asarray(_tagged(lin, x, np.full((3,), -1, np.int32)))
    np.testing.assert_array_equal(off, base)  # all off: the base, bit for bit
    np.testing.assert_array_equal(mixed[2], base[2])
    w = np.asarray(lin.kernel[...])
    for row, i in enumerate([0, 2]):
        alone = np.asarray(_tagged(lin, x[row : row + 1], np.array([i], np.int32)))
        merged = np.asarray(x[row]) @ (w + np.asarray(ad.delta_kernel_of(i)))
        np.testing.assert_allclose(mixed[row], alone[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mixed[row], merged, rtol=1e-5, atol=1e-5)
        assert np.abs(mixed[row] - base[row]).max() > 1e-3
    lin.adapter = None


@nnx.jit(static_argnums=(0, 1, 2))
def _lin_and_adapter(routing, n=4, top_k=1):
    """The projection and its molora adapter, built in one compiled program (eagerly every op
    compiles), with numpy-drawn nonzero b (and router)."""
    lin = Linear((6,), (5,), axes=(None, None), rngs=nnx.Rngs(0))
    ad = lr.make_method("molora", num_adapters=n, rank=2, routing=routing, top_k=top_k).build(
        "x", lin, rngs=nnx.Rngs(1)
    )
    ad.b[...] = jnp.asarray(_normal(ad.b.shape, 2))
    if ad.router is not None:
        ad.router[...] = jnp.asarray(3.0 * _normal(ad.router.shape, 4))
    return lin, ad


def test_one_hot_router_is_the_chosen_lora():
    _, ad = _lin_and_adapter("router")
    x = jnp.asarray(_normal((2, 3, 6), 6))
    got = np.asarray(nnx.jit(lambda ad, x: ad.delta(x, None))(ad, x))
    a, b, w = (np.asarray(v[...], np.float64) for v in (ad.a, ad.b, ad.router))
    xs = np.asarray(x, np.float64)
    choice = np.argmax(xs @ w, axis=-1)
    want = (
        np.stack(
            [[(xs[i, t] @ a[choice[i, t]]) @ b[choice[i, t]] for t in range(3)] for i in range(2)]
        )
        * ad.scaling
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = np.asarray(nnx.jit(lambda ad, x: ad.gates(x))(ad, x))
    np.testing.assert_array_equal(g.max(-1), 1.0)
    np.testing.assert_array_equal((g > 0).sum(-1), 1)


@pytest.mark.parametrize("routing", ["tag", "router"])
def test_gradients_reach_only_chosen_adapters(routing):
    _, ad = _lin_and_adapter(routing)
    x = jnp.asarray(_normal((2, 2, 6), 7))
    ids = None
    if routing == "tag":
        ids = np.array([1, -1], np.int32)
        chosen = {1}
    else:
        chosen = set(np.argmax(np.asarray(x) @ np.asarray(ad.router[...]), -1).ravel().tolist())
    assert len(chosen) < 4
    graphdef, params, rest = nnx.split(ad, AdapterParam, ...)

    def loss(p):
        ctx = None if ids is None else Context.create(2, 2, sequence_ids_B=jnp.asarray(ids))
        return jnp.sum(nnx.merge(graphdef, p, rest).delta(x, ctx) ** 2)

    g = jax.jit(jax.grad(loss))(params)  # one compiled fwd+bwd
    for name in ("a", "b"):
        gi = np.asarray(g[name][...])
        for i in range(4):
            hit = np.abs(gi[i]).max()
            assert (hit > 0) if i in chosen else (hit == 0), (name, i, hit)


def test_config_validation():
    lin = Linear((6,), (5,), axes=(None, None), rngs=nnx.Rngs(0))
    for bad, field in [
        (dict(num_adapters=0, rank=2), "num_adapters"),
        (dict(rank=9), "rank"),
        (dict(rank=2, routing="soft"), "routing"),
        (dict(rank=2, routing="router", num_adapters=2, top_k=3), "top_k"),
    ]:
        with pytest.raises(ValueError, match=field):
            lr.make_method("molora", **bad).validate("x", lin)
    _, ad = _lin_and_adapter("tag")
    with pytest.raises(ValueError, match="sequence_ids_B"):
        ad.delta(jnp.ones((2, 6)), None)
    ctx = Context.create(2, 1, sequence_ids_B=jnp.array([0, 4], jnp.int32))
    with pytest.raises(ValueError, match="sequence_ids_B must lie"):
        ad.delta(jnp.ones((2, 6)), ctx)
    y = np.asarray(jax.jit(lambda c: ad.delta(jnp.ones((2, 6)), c))(ctx))  # unchecked: NaN row
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()
    with pytest.raises(ValueError, match="delta_kernel_of"):
        ad.delta_kernel(jnp.zeros((6, 5)))
