"""apply / set_active / disabled / merge / remove: named adapters on the projections of a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as L
from models import DecoderLM, get_config

TOK = np.random.default_rng(1).integers(0, 256, (2, 8)).astype(np.int32)  # numpy: no compile


@nnx.jit
def _fwd(model, tokens):
    return model(tokens)


# models are built, adapted, merged and called in compiled programs (eagerly, every op
# compiles); a jitted build has the eager build's parameters
@nnx.jit(static_argnums=0)
def _model(name="llama-tiny"):
    return DecoderLM(get_config(name), rngs=nnx.Rngs(0))


def _in_jit(fn):
    """``fn(model)`` (merge / unmerge) in one compiled program; its returned paths dropped."""
    return nnx.jit(lambda m: (fn(m), None)[1])


def _add(model, name, seed, targets=r"attn/(q|v)$|mlp/gate", **opts):
    """Apply adapter ``name`` with non-zero numpy-drawn b (one compiled program)."""
    cfg = L.AdapterConfig(options=dict(rank=2) | opts, targets=targets, name=name)

    @nnx.jit
    def add(m):
        paths = L.apply(m, cfg, rngs=nnx.Rngs(seed))
        rng = np.random.default_rng(seed)
        for p in paths:
            ad = L.linear_paths(m)[p].adapter.adapters[name]
            ad.b[...] = jnp.asarray(0.05 * rng.standard_normal(ad.b.shape, np.float32))
        return len(paths)

    assert int(add(model)) > 0


def test_targets_exclude_all_linear_and_patterns():
    """targets list / all-linear (no lm_head, as PEFT) / exclude; rank_pattern, alpha_pattern and
    overrides change the per-path fields."""
    m = _model()
    cfg = L.AdapterConfig(
        options=dict(rank=2),
        exclude=r"layers/1",
        rank_pattern={r"mlp/": 4},
        alpha_pattern={r"attn/o$": 32.0},
        overrides={r"mlp/down$": {"rank": 6}},
    )
    paths = L.apply(m, cfg, rngs=nnx.Rngs(0))
    assert "lm_head" not in paths and paths and all(p.startswith("layers/0/") for p in paths)
    lp = L.linear_paths(m)
    assert lp["layers/0/attn/q"].adapter.adapters["default"].a.shape[-1] == 2
    assert lp["layers/0/mlp/up"].adapter.adapters["default"].a.shape[-1] == 4
    assert lp["layers/0/mlp/down"].adapter.adapters["default"].a.shape[-1] == 6
    assert lp["layers/0/attn/o"].adapter.adapters["default"].scaling == 16.0
    m2 = _model()
    got = L.apply(m2, L.AdapterConfig(targets=[r"attn/k$", r"^lm_head$"]), rngs=nnx.Rngs(0))
    assert got == ["layers/0/attn/k", "layers/1/attn/k", "lm_head"]


def test_weighted_combination_is_sum_of_weighted_deltas_and_merges():
    """set_active({x: 0.7, y: -0.4}) gives W + 0.7 d_x + (-0.4) d_y (logit deltas add linearly at
    the first projection's output, checked on the effective kernels); merge == unmerged forward;
    unmerge restores the base kernels."""
    m = _model()
    w0 = {p: np.asarray(lin.kernel[...]) for p, lin in L.linear_paths(m).items()}
    _add(m, "x", 1)
    _add(m, "y", 2, targets=r"attn/q$")  # y only on q
    lin = L.linear_paths(m)["layers/0/attn/q"]
    w = lin.base_kernel()
    dx = lin.adapter.adapters["x"].delta_kernel(w)
    dy = lin.adapter.adapters["y"].delta_kernel(w)
    L.set_active(m, {"x": 0.7, "y": -0.4})
    np.testing.assert_allclose(lin.effective_kernel(), w + 0.7 * dx - 0.4 * dy, atol=1e-6)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 64), np.float32))
    want = x @ w.reshape(64, -1) + (x @ (0.7 * dx - 0.4 * dy).reshape(64, -1))
    np.testing.assert_allclose(lin(x).reshape(3, -1), want, atol=1e-5)
    assert L.linear_paths(m)["layers/0/attn/v"].adapter.active == (("x", 0.7),)
    y = np.asarray(_fwd(m, TOK))
    _in_jit(L.merge)(m)
    np.testing.assert_allclose(np.asarray(_fwd(m, TOK)), y, atol=2e-5)
    with pytest.raises(ValueError, match="unmerge first"):
        L.set_active(m, "x")
    _in_jit(L.unmerge)(m)
    for p, lin2 in L.linear_paths(m).items():
        np.testing.assert_allclose(np.asarray(lin2.kernel[...]), w0[p], atol=1e-6)


def test_disabled_runs_the_base_and_remove_empties_slots():
    """disabled() gives the base logits and restores the adapters on exit; remove deletes one
    adapter (the slot is None when none is left)."""
    m = _model()
    y0 = np.asarray(_fwd(m, TOK))
    _add(m, "x", 1)
    ya = np.asarray(_fwd(m, TOK))
    assert np.abs(ya - y0).max() > 1e-3
    with L.disabled(m):
        np.testing.assert_allclose(np.asarray(_fwd(m, TOK)), y0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_fwd(m, TOK)), ya, atol=1e-6)
    _add(m, "y", 2, targets=r"attn/q$")
    L.remove(m, "x")
    lp = L.linear_paths(m)
    assert lp["layers/0/attn/v"].adapter is None
    assert list(lp["layers/0/attn/q"].adapter.adapters) == ["y"]
    with pytest.raises(ValueError, match="no projection holds an adapter named 'x'"):
        L.remove(m, "x")


def test_errors():
    """unknown method (close matches), targets matching nothing, same name twice, bad targets,
    unknown active name."""
    m = _model()
    with pytest.raises(ValueError, match=r"unknown adapter method 'lroa'.*did you mean.*lora"):
        L.apply(m, L.AdapterConfig(method="lroa"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"matches no projection.*close matches"):
        L.apply(m, L.AdapterConfig(targets=r"attn/query"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="targets must be"):
        L.apply(m, L.AdapterConfig(targets=3), rngs=nnx.Rngs(0))
    L.apply(m, L.AdapterConfig(targets=r"attn/q$"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        L.apply(m, L.AdapterConfig(targets=r"attn/(q|k)$"), rngs=nnx.Rngs(0))
    assert L.linear_paths(m)["layers/0/attn/k"].adapter is None  # nothing half-applied
    with pytest.raises(ValueError, match=r"no adapter named \['z'\]"):
        L.set_active(m, ["z"])


def test_tied_head_refuses_base_rewrite_and_merge():
    """A tied LM head shares the embedding: PiSSA (base rewrite) and merge raise."""
    m = _model("qwen2-tiny")
    with pytest.raises(ValueError, match="tied"):
        L.apply(
            m, L.AdapterConfig(targets="^lm_head$", options=dict(init="pissa")), rngs=nnx.Rngs(0)
        )
    m = _model("qwen2-tiny")
    L.apply(m, L.AdapterConfig(targets="^lm_head$"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tied head"):
        L.merge(m)


def test_merged_or_disabled_model_runs_the_base_program():
    """With every adapter merged (or disabled) the forward is the base model's program: the
    same primitives in the same order (no ``y + 0`` left per projection)."""

    def prims(model):
        graph, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graph, s)(t))(state, TOK)
        return [e.primitive.name for e in jaxpr.jaxpr.eqns]

    base = prims(_model())
    m = _model()
    _add(m, "default", 3)
    assert prims(m) != base
    with L.disabled(m):
        assert prims(m) == base
    _in_jit(L.merge)(m)
    assert prims(m) == base


def test_adapter_on_a_factorised_kernel_runs_unmerged_and_merge_is_refused():
    # a LoRA on a projection stored as B·A (jaxattn.optim.parameterize) adds its delta to the
    # factorised forward; merging (or a base-rewriting init) would need a dense W: refused
    from jaxattn.layers import Linear
    from jaxattn.optim import parameterize

    lin = Linear((8,), (6,), axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    model = nnx.Dict(up=lin)
    parameterize(model, "lowrank", rank=2, paths="up", rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8), np.float32))
    base = np.asarray(lin(x))
    L.apply(model, L.AdapterConfig(options={"rank": 2}, targets="up"), rngs=nnx.Rngs(2))
    ad = lin.adapter.adapters["default"]
    ad.b[...] = jnp.ones_like(ad.b[...])
    want = base + np.asarray(x @ ad.a[...] @ ad.b[...]) * ad.scaling
    np.testing.assert_allclose(np.asarray(lin(x)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"merge: 'up' holds a factorised"):
        L.merge(model)
