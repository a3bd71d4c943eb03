"""IncreLoRA (PAPERS.md §7): inactive components contribute exactly 0 and get 0 gradient; the
module score is Σ|ΔK ⊙ xᵀdy|/√n (numpy); under the procedure ranks never decrease, grow by
add_rank in the top modules by Ī·Ū, never past the budget, and growth leaves the function."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam, Linear
from jaxattn.lowrank.methods._taps import TAP_SCALE
from jaxattn.lowrank.methods.increlora import IncreLoRAConfig, increlora_procedure

D, R = 6, 4


def _lin(seed=1):
    return Linear((D,), (D,), axes=("embed", "mlp"), rngs=nnx.Rngs(seed))


@nnx.jit(static_argnums=0)
def _model(n=3):
    """n adapted projections, built in one compiled program (eagerly, every op compiles); the
    same values as the eager build."""
    model = nnx.List([_lin(i) for i in range(n)])
    cfg = IncreLoRAConfig(rank=1, max_rank=R, target_rank=2, add_rank=1, alpha=1.0)
    options = {k: v for k, v in cfg.to_json().items() if k != "method"}
    lr.apply(model, lr.AdapterConfig(method="increlora", targets=".*", options=options),
             rngs=nnx.Rngs(5))  # fmt: skip
    return model


def test_inactive_components_are_exactly_zero_and_score_matches_numpy():
    model = _model(1)
    lin = model[0]
    ad = lin.adapter.adapters["default"]
    ad.e[...] = jnp.array([0.7, 0.4, -0.3, 0.9])
    ad.active[...] = jnp.array([1.0, 1.0, 0.0, 0.0])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, D), np.float32))
    c = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, D), np.float32))
    delta = nnx.jit(lambda ad, x: ad.delta(x, None, base=None))  # one compile
    out = delta(ad, x)
    a, b, e = (np.asarray(v[...]) for v in (ad.a, ad.b, ad.e))
    ref = 1.0 * ((np.asarray(x) @ a[:, :2]) * e[:2]) @ b[:2]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    huge = b.copy()
    huge[2:] = 1e30  # a huge inactive component changes nothing
    ad.b[...] = jnp.asarray(huge)
    np.testing.assert_array_equal(np.asarray(delta(ad, x)), np.asarray(out))
    ad.b[...] = jnp.asarray(b)

    graphdef, params, rest = nnx.split(model, AdapterParam, ...)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)[0](x) * c)  # dL/dy = c

    g = jax.jit(jax.grad(loss))(params)[0]["adapter"]["adapters"]["default"]
    for name in ("a", "e"):
        assert not np.any(np.asarray(g[name][...])[..., 2:]), name
    assert not np.any(np.asarray(g["b"][...])[2:])
    assert not np.any(np.asarray(g["active"][...]))
    dk = (a[:, :2] * e[:2]) @ b[:2]
    grad_dk = np.asarray(x).reshape(-1, D).T @ np.asarray(c).reshape(-1, D)  # ∂L/∂ΔK
    want = np.sum(np.abs(dk * grad_dk)) / np.sqrt(dk.size)
    np.testing.assert_allclose(float(g["ipt"][...]) / TAP_SCALE, want, rtol=1e-5)


def test_rank_grows_by_importance_within_budget_without_changing_the_function():
    model = _model(3)
    x = jax.random.normal(jax.random.key(2), (32, D))
    # module j must fit a change of size j: the later modules matter more
    targets = [x @ (m.kernel[...] + 0.5 * j * jax.random.normal(jax.random.key(j), (D, D)))
               for j, m in enumerate(model)]  # fmt: skip
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)
    tx = increlora_procedure(optax.adam(3e-2), target_rank=2, add_rank=1, interval=3,
                             warmup=2, top_h=1)  # fmt: skip
    opt = tx.init(params)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        return sum(jnp.mean((m[j](x) - targets[j]) ** 2) for j in range(3))

    @jax.jit
    def step(p, opt):
        g = jax.grad(loss)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, u

    def ranks(p):
        return np.array([int(np.sum(p[j]["adapter"]["adapters"]["default"]["active"][...]))
                         for j in range(3)])  # fmt: skip

    history, grown = [ranks(params)], []
    for t in range(1, 16):
        before = params
        params, opt, upd = step(params, opt)
        r = ranks(params)
        assert np.all(r >= history[-1]) and r.sum() <= 2 * 3  # non-decreasing, budget
        if np.any(r != history[-1]):
            assert t > 2 and t % 3 == 0
            score = np.where(history[-1] + 1 <= R, np.asarray(opt[2] * opt[3]), -np.inf)
            (j,) = [int(i) for i in np.nonzero(r - history[-1])[0]]
            assert j == int(np.argmax(score)), (t, score)  # the most important with room
            grown.append(j)
            # the new component (e = 0) leaves the function as it was at this step
            with_old = jax.tree.map(lambda v: v, params)
            for k in range(3):
                ad = with_old[k]["adapter"]["adapters"]["default"]
                ad["active"] = before[k]["adapter"]["adapters"]["default"]["active"]
            xs = jax.random.normal(jax.random.key(9), (4, D))
            new_m, old_m = nnx.merge(graphdef, params, rest), nnx.merge(graphdef, with_old, rest)
            np.testing.assert_array_equal(np.asarray(new_m[j](xs)), np.asarray(old_m[j](xs)))
        history.append(r)
    assert history[-1].sum() == 2 * 3 and len(grown) == 3  # budget reached, then stops
    assert grown[0] == 2  # the module with the largest change to fit grows first


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(rank=0), "rank=0"),
        (dict(max_rank=7), r"max_rank=7 .*\[1, 6\]"),
        (dict(rank=3, max_rank=2), r"rank=3 .*\[1, 2\]"),
        (dict(target_rank=9), r"target_rank=9 must be an int in \[rank=2, max_rank=6\]"),
        (dict(add_rank=0), "add_rank=0"),
        (dict(interval=0), "interval=0 must be an int >= 1"),
        (dict(beta1=1.0), r"beta1=1.0 must be in \(0, 1\)"),
    ],
)
def test_bad_config(fields, match):
    with pytest.raises(ValueError, match=match):
        IncreLoRAConfig(**({"max_rank": 6} | fields)).build("q", _lin(), rngs=nnx.Rngs(0))


def test_procedure_needs_increlora_adapters():
    with pytest.raises(ValueError, match="no IncreLoRA adapter"):
        increlora_procedure(optax.sgd(0.1), target_rank=2, add_rank=1, interval=1).init(
            {"w": jnp.ones(3)}
        )
