"""LoRAPrune (PAPERS.md §7): the importance is the paper's Σ_g |(a∇b + ∇a b − ∇a∇b) ⊙ (W + s·ab)|
written out in numpy, from a backward that never forms ∂L/∂W (no xᵀ·dy contraction in its
jaxpr); masked v heads / up channels are dead structure (their q/k/o and gate/down parts can be
removed); the merged pruned model equals the masked one; the procedure follows the official
cubic schedule, prunes the lowest-average groups and masks only shrink."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam, Linear
from jaxattn.lowrank.methods._taps import TAP_SCALE
from jaxattn.lowrank.methods.loraprune import (
    LoRAPruneConfig,
    loraprune_procedure,
    masks,
    slice_pruned,
    sparsity_schedule,
)
from models import DecoderLM, get_config

N_TOK, RANK = 7, 2
RNG = np.random.default_rng  # numpy draws: no per-shape device compiles


def _one():
    model = nnx.List([Linear((8,), (4, 3), axes=("embed", None, None), rngs=nnx.Rngs(0))])
    opts = {"rank": RANK, "alpha": 3.0, "prune": ".*"}
    lr.apply(model, lr.AdapterConfig(method="loraprune", options=opts, targets=".*"),
             rngs=nnx.Rngs(1))  # fmt: skip
    ad = model[0].adapter.adapters["default"]
    ad.b[...] = jnp.asarray(0.3 * RNG(2).standard_normal(ad.b.shape, np.float32))
    return model, ad


def _dots(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dots(inner)


def test_importance_is_the_papers_equation_without_weight_gradient():
    model, ad = _one()
    x = RNG(3).standard_normal((N_TOK, 8), np.float32)
    c = RNG(4).standard_normal((N_TOK, 4, 3), np.float32)
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)

    def loss(p):  # nonlinear in the output
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, p, rest)[0](x)) * c)

    g = jax.jit(jax.grad(loss))(params)[0]["adapter"]["adapters"]["default"]
    w = np.asarray(model[0].kernel[...]).reshape(8, 12)
    a, b = np.asarray(ad.a[...]), np.asarray(ad.b[...]).reshape(RANK, 12)
    ga, gb = np.asarray(g["a"][...]), np.asarray(g["b"][...]).reshape(RANK, 12)
    # PyTorch layout of the paper / official code: B = bᵀ [out, r], A = aᵀ [r, in]
    B, A, gB, gA = b.T, a.T, gb.T, ga.T
    G = gB @ A + B @ gA - gB @ gA  # [out, in]
    s = np.abs(G * (B @ A * 1.5 + w.T))  # scaling = alpha / r = 1.5
    want = s.reshape(4, 3, 8).sum(axis=(1, 2))  # per head of 3 output rows
    np.testing.assert_allclose(np.asarray(g["sens"][...]) / TAP_SCALE, want, rtol=1e-5)
    assert not np.any(np.asarray(g["mask"][...]))
    # ∂L/∂W (a contraction of x with dy over the tokens, W-shaped) is never formed
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    for eqn in _dots(jaxpr):
        (lc, _), _ = eqn.params["dimension_numbers"]
        sizes = [eqn.invars[0].aval.shape[d] for d in lc]
        assert not (N_TOK in sizes and eqn.outvars[0].aval.size == w.size), eqn


def _np_importance(ad, w, g, side):
    """The official compute_sensitivity (before normalisation) in numpy, PyTorch layout."""
    fi = w.shape[0]
    a, b = np.asarray(ad.a[...]).reshape(fi, -1), np.asarray(ad.b[...]).reshape(RANK, -1)
    ga, gb = np.asarray(g["a"][...]).reshape(fi, -1), np.asarray(g["b"][...]).reshape(RANK, -1)
    B, A, gB, gA = b.T, a.T, gb.T, ga.T
    s = np.abs((gB @ A + B @ gA - gB @ gA) * (B @ A * ad.scale + w.T))  # [out, in]
    if side == "in":  # transposed: rows are the input features
        s = s.T
    return s.reshape(ad.sens.shape[0], -1).sum(axis=1)


def test_block_sums_q_k_o_into_the_v_head_score():
    # official update_sensitivity_dict: each module's vector normalised, summed per layer
    # block (o along its input heads, q's 4 heads onto the 2 kv heads), then the EMA
    lin = lambda i, o, ax: Linear(i, o, axes=ax, rngs=nnx.Rngs(len(i) + len(o) + sum(o)))
    model = nnx.Dict(attn=nnx.Dict(q=lin((8,), (4, 2), ("embed", None, None)),
                                   v=lin((8,), (2, 2), ("embed", None, None)),
                                   o=lin((4, 2), (8,), (None, None, "embed"))))  # fmt: skip
    lr.apply(model, lr.AdapterConfig(method="loraprune", options={"rank": RANK}, targets=".*"),
             rngs=nnx.Rngs(1))  # fmt: skip
    lins = lr.linear_paths(model)
    ads = {p.split("/")[-1]: lins[p].adapter.adapters["default"] for p in lins}
    assert (ads["q"].role, ads["v"].role, ads["o"].role) == ("out", "mask", "in")
    for k, ad in ads.items():
        ad.b[...] = jnp.asarray(0.3 * RNG(ord(k)).standard_normal(ad.b.shape, np.float32))
    x = RNG(3).standard_normal((N_TOK, 8), np.float32)
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        h = jnp.tanh(m["attn"]["q"](x)) * jnp.repeat(m["attn"]["v"](x), 2, axis=1)
        return jnp.sum(jnp.sin(m["attn"]["o"](h)))

    g = jax.jit(jax.grad(loss))(params)
    tx = loraprune_procedure(optax.sgd(0.0), total_steps=10, every=10)
    upd, _ = jax.jit(tx.update)(g, tx.init(params), params)
    unit = {}
    for k, side in (("q", "out"), ("v", "out"), ("o", "in")):
        w = np.asarray(lins[f"attn/{k}"].kernel[...]).reshape(lins[f"attn/{k}"].fan_in, -1)
        raw = _np_importance(ads[k], w, g["attn"][k]["adapter"]["adapters"]["default"], side)
        gs = np.asarray(g["attn"][k]["adapter"]["adapters"]["default"]["sens"][...])
        np.testing.assert_allclose(gs / TAP_SCALE, raw, rtol=1e-5)  # each tap's equation
        unit[k] = raw / (np.linalg.norm(raw) + 1e-8)
    want = 0.1 * (unit["v"] + unit["q"].reshape(2, 2).sum(1) + unit["o"].reshape(2, 2).sum(1))
    got = upd["attn"]["v"]["adapter"]["adapters"]["default"]
    np.testing.assert_allclose(np.asarray(got["sens"][...]), want, rtol=1e-5)
    for k in ("q", "o"):  # contributing taps stay 0
        assert not np.any(np.asarray(upd["attn"][k]["adapter"]["adapters"]["default"]["sens"][...]))


@nnx.jit
def _lm():
    """The 1-layer adapted llama-tiny, built in one compiled program (eagerly, every op of the
    init compiles); the same parameters as the eager build."""
    model = DecoderLM(get_config("llama-tiny", num_layers=1), rngs=nnx.Rngs(0))
    cfg = lr.AdapterConfig(method="loraprune", options={"rank": RANK},
                           targets=r"attn/(q|v)$|mlp/(up|down)$")  # fmt: skip
    lr.apply(model, cfg, rngs=nnx.Rngs(1))
    return model


def _in_jit(fn):
    """``fn(model)`` (merge / unmerge) in one compiled program; its returned paths dropped."""
    return nnx.jit(lambda m: (fn(m), None)[1])


@pytest.fixture(scope="module")
def lm():
    return _lm()


def test_masks_remove_whole_heads_and_channels_and_merge_exactly(lm):
    model = lm
    rng = np.random.default_rng(0)  # numpy draws and edits: no per-shape device compiles
    tokens = rng.integers(0, 256, (2, 6)).astype(np.int32)
    fwd = nnx.jit(lambda m, t: m(t))  # one compile per model structure (any kernel values)
    base = fwd(model, tokens)  # b = 0, mask = 1: the base model (test_seed_methods_model)
    assert sorted(masks(model)) == ["layers/0/attn/v/adapter/adapters/default",
                                    "layers/0/mlp/up/adapter/adapters/default"]  # fmt: skip
    lins = lr.linear_paths(model)
    for p in ("layers/0/attn/q", "layers/0/attn/v", "layers/0/mlp/up", "layers/0/mlp/down"):
        ad = lins[p].adapter.adapters["default"]
        ad.b[...] = jnp.asarray(0.1 * rng.standard_normal(ad.b.shape, np.float32))
    v = lins["layers/0/attn/v"].adapter.adapters["default"]
    up = lins["layers/0/mlp/up"].adapter.adapters["default"]
    v.mask[...] = jnp.asarray(np.array([1.0, 0.0], np.float32))  # kv head 1 (q heads 2, 3)
    dead = np.arange(0, 128, 3)
    up_mask = np.array(up.mask[...])
    up_mask[dead] = 0.0
    up.mask[...] = jnp.asarray(up_mask)
    masked = fwd(model, tokens)
    assert float(jnp.max(jnp.abs(masked - base))) > 1e-4
    # dead structure: o's rows of q heads 2, 3, gate's and down's pruned channels, k head 1
    saved = {p: lins[p].kernel[...] for p in ("layers/0/attn/o", "layers/0/mlp/gate",
                                              "layers/0/mlp/down", "layers/0/attn/k")}  # fmt: skip
    edits = {
        "layers/0/attn/o": (np.s_[2:], 7.0),
        "layers/0/mlp/gate": (np.s_[:, dead], -5.0),
        "layers/0/mlp/down": (np.s_[dead], 3.0),
        "layers/0/attn/k": (np.s_[:, 1], 2.0),
    }
    for p, (where, value) in edits.items():
        k = np.array(saved[p])
        k[where] = value
        lins[p].kernel[...] = jnp.asarray(k)
    np.testing.assert_allclose(np.asarray(fwd(model, tokens)), np.asarray(masked), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    for p, k in saved.items():
        lins[p].kernel[...] = k
    _in_jit(lr.merge)(model)  # the merged pruned model == the masked model
    np.testing.assert_allclose(np.asarray(fwd(model, tokens)), np.asarray(masked), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert not np.any(np.asarray(lins["layers/0/attn/v"].kernel[...])[:, 1])
    assert not np.any(np.asarray(lins["layers/0/mlp/up"].kernel[...])[:, dead])
    # physically sliced: 1 kv head (2 query heads) and 128 - 43 channels left, same logits
    small = slice_pruned(model)
    c = small.config
    assert (c.num_kv_heads, c.num_heads, c.mlp_dim) == (1, 2, 128 - len(dead))
    assert (
        small.layers[0].attn.o.kernel.shape[0] == 2
        and small.layers[0].mlp.down.kernel.shape[0] == 85
    )
    np.testing.assert_allclose(np.asarray(fwd(small, tokens)), np.asarray(masked), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    _in_jit(lr.unmerge)(model)
    with pytest.raises(ValueError, match=r"'layers/0/attn/v' is not merged"):
        slice_pruned(model)
    np.testing.assert_allclose(np.asarray(fwd(model, tokens)), np.asarray(masked), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def _official_schedule(step, total, w0, w1, init, final):  # prune.py's cubic schedule
    if step <= w0 * total:
        return init
    if step > total - w1 * total:
        return final
    mul = 1 - (step - w0 * total) / (total - (w0 + w1) * total)
    return final + (init - final) * mul**3


def test_procedure_schedule_lowest_groups_pruned_and_masks_shrink():
    total = 20
    for t in range(total + 1):
        got = float(sparsity_schedule(t, total, 0.1, 0.2, 0.0, 0.5))
        np.testing.assert_allclose(got, _official_schedule(t, total, 0.1, 0.2, 0.0, 0.5), atol=1e-6)
    model, ad = _one()
    x = RNG(5).standard_normal((N_TOK, 8), np.float32)
    y = RNG(6).standard_normal((N_TOK, 4, 3), np.float32)
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)
    tx = loraprune_procedure(optax.adam(1e-2), total_steps=total, ratio=0.5, warmup=0.1,
                             cooldown=0.2, every=2, beta=0.9)  # fmt: skip
    opt = tx.init(params)

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, p, rest)[0](x) - y) ** 2)

    @jax.jit
    def step(p, opt):
        g = jax.grad(loss)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, g

    def leaf(p, name):
        return np.asarray(p[0]["adapter"]["adapters"]["default"][name][...])

    sens = np.zeros(4)
    mask = leaf(params, "mask")
    for t in range(1, total + 1):
        params, opt, g = step(params, opt)
        raw = leaf(g, "sens") / TAP_SCALE
        sens = 0.9 * sens + 0.1 * raw / (np.linalg.norm(raw) + 1e-8)  # moving average
        np.testing.assert_allclose(leaf(params, "sens"), sens, rtol=1e-4, atol=1e-7)
        new = leaf(params, "mask")
        assert np.all(new <= mask)  # masks only shrink
        rho = _official_schedule(t, total, 0.1, 0.2, 0.0, 0.5)
        if t % 2 or rho <= 0 or (1 - mask.mean()) >= 0.5:
            np.testing.assert_array_equal(new, mask)
        else:
            need = int(np.floor(4 * rho))
            key = np.where(mask > 0, sens, -1.0)
            np.testing.assert_array_equal(new == 0, np.isin(np.arange(4), np.argsort(key)[:need]))
        mask = new
    assert mask.sum() == 2  # the final ratio 0.5 of the 4 heads


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(rank=0), "rank=0"),
        (dict(ratio=1.0), r"ratio=1.0 must be in \(0, 1\)"),
        (dict(init_ratio=0.6), r"init_ratio=0.6 must be in \[0, ratio=0.5\)"),
        (dict(warmup=0.6, cooldown=0.5), "cooldown=0.5 must be < 1 - warmup"),
        (dict(every=0), "every=0 must be an int >= 1"),
        (dict(prune="(("), "prune='\\(\\(' is not a regex"),
    ],
)
def test_bad_config(fields, match):
    lin = Linear((8,), (6,), axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        LoRAPruneConfig(**({"rank": 2} | fields)).build("q", lin, rngs=nnx.Rngs(0))
