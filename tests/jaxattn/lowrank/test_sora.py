"""SoRA (PAPERS.md §7): pruned components contribute 0, effective rank non-increasing under
the proximal step, lam = 0 is LoRA, merges into a dense weight."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam, Linear
from jaxattn.lowrank.methods.sora import SoRAConfig, effective_rank, sora_proximal

R = 6


def _model(seed=0):
    model = nnx.List([Linear((8,), (8,), axes=("embed", "mlp"), rngs=nnx.Rngs(1))])
    lr.attach(model, ".*", lambda p, lin: SoRAConfig(rank=R, alpha=R).build(
        p, lin, rngs=nnx.Rngs(seed)))  # fmt: skip
    return model


def test_zero_init_pruned_zero_and_merge():
    model = _model()
    lin, ad = model[0], model[0].adapter
    x = jax.random.normal(jax.random.key(0), (5, 8))
    np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(x @ lin.kernel[...]))
    ad.b[...] = jax.random.normal(jax.random.key(1), ad.b.shape)
    ad.gate[...] = jnp.array([1.0, 0.0, -0.5, 0.0, 2.0, 0.0])
    full = ad.delta(x, None, base=None)
    # pruned components (gate 0) contribute exactly 0: dropping them changes nothing
    keep = np.array([0, 2, 4])
    ref = (x @ ad.a[...][:, keep] * ad.gate[...][keep]) @ ad.b[...][keep]
    np.testing.assert_allclose(np.asarray(full), np.asarray(ref), rtol=1e-5, atol=1e-6)
    huge = ad.b[...].at[1].set(1e30).at[3].set(-1e30)
    ad.b[...] = huge
    np.testing.assert_array_equal(np.asarray(ad.delta(x, None, base=None)), np.asarray(full))
    merged = x @ lin.effective_kernel()
    np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(merged), rtol=1e-5, atol=1e-5)
    assert effective_rank(ad) == 3


def _target():
    """A rank-2 target change of the weight (the adapter needs 2 of its R components)."""
    u = jax.random.normal(jax.random.key(7), (8, 2))
    v = jax.random.normal(jax.random.key(6), (2, 8))
    return u @ v


def _train(lam, steps=30, lr_=0.05, sticky=True, inner=optax.sgd):
    model = _model()
    x = jax.random.normal(jax.random.key(8), (64, 8))
    y = x @ (model[0].kernel[...] + _target())
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)
    tx = optax.chain(inner(lr_), sora_proximal(lam, lr_, sticky=sticky))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p, rest)[0](x) - y) ** 2)

        val, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, val

    ranks, losses, gates = [], [], []
    for _ in range(steps):
        params, opt, val = step(params, opt)
        m = nnx.merge(graphdef, params, rest)
        ranks.append(effective_rank(m[0].adapter))
        losses.append(float(val))
        gates.append(np.asarray(m[0].adapter.gate[...]))
    return ranks, losses, gates, params


def test_effective_rank_non_increasing_and_prunes():
    # toy regression on a rank-2 change of the weight, Adam inner step + proximal gate step
    ranks, losses, _, _ = _train(lam=1.6, steps=200, lr_=0.02, inner=optax.adam)
    assert ranks[0] == R
    assert all(a >= b for a, b in zip(ranks, ranks[1:], strict=False))
    assert 2 <= ranks[-1] < R  # pruned, but not below the target's rank
    assert losses[-1] < 0.05 * losses[0]


def test_lam_zero_is_lora():
    _, l_sora, g_sora, p_sora = _train(lam=0.0, steps=5)
    # the same steps with plain SGD (no proximal transform) give identical parameters
    model = _model()
    x = jax.random.normal(jax.random.key(8), (64, 8))
    y = x @ (model[0].kernel[...] + _target())
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)
    tx = optax.sgd(0.05)
    opt = tx.init(params)
    for _ in range(5):
        g = jax.grad(lambda p: jnp.mean((nnx.merge(graphdef, p, rest)[0](x) - y) ** 2))(params)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p_sora), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # at init (gate = 1, scale alpha / rank = 1) the formula is LoRA's B·A
    ad = _model()[0].adapter
    ad.b[...] = jax.random.normal(jax.random.key(2), ad.b.shape)
    xx = jax.random.normal(jax.random.key(3), (3, 8))
    lora = xx @ ad.a[...] @ ad.b[...]
    got = ad.delta(xx, None, base=None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(lora), rtol=1e-5, atol=1e-6)


def test_proximal_only_touches_gates_and_soft_thresholds():
    tx = sora_proximal(1.0, 0.5)
    g0, u0 = jnp.array([0.2, -0.9, 0.0, 3.0]), jnp.array([0.1, 0.0, 0.7, -1.0])
    params = {"q": {"adapter": {"gate": g0, "b": jnp.ones(4)}}, "router": {"gate": g0}}
    updates = {"q": {"adapter": {"gate": u0, "b": jnp.full(4, 0.3)}}, "router": {"gate": u0}}
    upd, _ = tx.update(updates, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    np.testing.assert_allclose(np.asarray(new["q"]["adapter"]["gate"]), [0.0, -0.4, 0.0, 1.5],
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(new["q"]["adapter"]["b"]), np.full(4, 1.3))
    np.testing.assert_allclose(np.asarray(new["router"]["gate"]), np.asarray(g0 + u0))
    loose, _ = sora_proximal(1.0, 0.5, sticky=False).update(updates, None, params)
    revived = optax.apply_updates(params, loose)["q"]["adapter"]["gate"][2]
    assert float(revived) == pytest.approx(0.2)


def test_validation():
    lin = Linear((8,), (4,), axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"rank=5.*'l/up'"):
        SoRAConfig(rank=5).validate("l/up", lin)
    with pytest.raises(ValueError, match="lam"):
        sora_proximal(-1.0, 0.1)
    with pytest.raises(ValueError, match="params"):
        sora_proximal(1.0, 0.1).update({"adapter": {"gate": jnp.ones(2)}}, None)


def test_proximal_finds_named_adapter_gates_and_follows_a_schedule():
    # lowrank.apply puts adapters at .../adapter/adapters/NAME/...; with a schedule η(t) the
    # threshold at step t is λ·η(t), t counted by the transform's own state.
    g0 = jnp.array([1.0, 0.3])
    params = {"q": {"adapter": {"adapters": {"default": {"gate": g0}}}}, "mlp": {"gate": g0}}
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = sora_proximal(1.0, lambda t: 0.1 * (t + 1))
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(zero, state, params)
        params = optax.apply_updates(params, updates)
    # step 0 thresholds by 0.1, step 1 by 0.2: 1.0 -> 0.7, 0.3 -> 0.0
    np.testing.assert_allclose(np.asarray(params["q"]["adapter"]["adapters"]["default"]["gate"]),
                               [0.7, 0.0], atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(params["mlp"]["gate"]), np.asarray(g0))
