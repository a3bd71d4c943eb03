"""LoRA method: PEFT initialisations, scaling, PiSSA / OLoRA / DoRA identities, model coverage."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as L
from jaxattn.layers import AdapterParam, Linear
from jaxattn.layers._context import Context
from models import DecoderLM, get_config

TOK = np.random.default_rng(1).integers(0, 256, (2, 8)).astype(np.int32)  # numpy: no compile


@nnx.jit
def _fwd(model, tokens):
    return model(tokens)


_BUILDERS = {}


def _model(name="llama-tiny", **kw):
    """The model, initialised in one compiled program per config (eagerly, every op compiles);
    the same parameters as the eager build."""
    key = (name, tuple(sorted(kw.items())))
    if key not in _BUILDERS:
        _BUILDERS[key] = nnx.jit(lambda: DecoderLM(get_config(name, **kw), rngs=nnx.Rngs(0)))
    return _BUILDERS[key]()


def _normal(shape, seed):
    """fp32 N(0, 1) drawn by numpy (jax.random would compile once per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


_delta = nnx.jit(lambda ad, x, w: ad.delta(x, None, base=w))


def _in_jit(fn):
    """``fn(model)`` (merge / unmerge) in one compiled program; returns how many paths."""
    return nnx.jit(lambda m: len(fn(m)))


def _randomize_b(model, seed=3, scale=0.05):
    """Give every factor ``b`` (zero at init) random values so the adapter changes the output."""
    rng = np.random.default_rng(seed)  # numpy: jax.random would compile once per shape
    for _, lin in L.linear_paths(model).items():
        if lin.adapter is None:
            continue
        for ad in lin.adapter.adapters.values():
            ad.b[...] = jnp.asarray(scale * rng.standard_normal(ad.b.shape), ad.b.dtype)


def _lora(model, targets="all-linear", **opts):
    """L.apply in one compiled program (eagerly, every init op compiles); returns its paths
    (recorded while tracing)."""
    cfg = L.AdapterConfig(options=dict(rank=4, alpha=8.0) | opts, targets=targets)
    out = []
    nnx.jit(lambda m: out.extend(L.apply(m, cfg, rngs=nnx.Rngs(5))))(model)
    return out


def test_zero_b_init_is_bit_identical_to_base_under_jit():
    """kaiming init has B = 0, so the adapted model equals the base exactly (all projections)."""
    m = _model()
    y0 = np.asarray(_fwd(m, TOK))
    paths = _lora(m, targets=".*")
    assert "lm_head" in paths and "layers/0/attn/q" in paths
    np.testing.assert_array_equal(np.asarray(_fwd(m, TOK)), y0)


def test_peft_init_distributions_and_scaling():
    """kaiming_uniform(a=sqrt 5) -> U(+-1/sqrt(fan_in)); gaussian std 1/r; s = alpha/r or
    alpha/sqrt(r) with rsLoRA."""
    lin = Linear((256,), (64,), axes=(None, None), rngs=nnx.Rngs(0))
    ad = L.make_method("lora", rank=16, alpha=8.0).build("p", lin, rngs=nnx.Rngs(1))
    a = np.asarray(ad.a[...])
    assert a.shape == (256, 16) and ad.b.shape == (16, 64) and a.dtype == np.float32
    bound = 1 / math.sqrt(256)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert np.all(np.asarray(ad.b[...]) == 0) and ad.scaling == 8.0 / 16
    g = L.make_method("lora", rank=16, init="gaussian").build("p", lin, rngs=nnx.Rngs(1))
    assert abs(float(g.a[...].std()) - 1 / 16) < 0.01
    rs = L.make_method("lora", rank=16, alpha=8.0, use_rslora=True).build(
        "p", lin, rngs=nnx.Rngs(1)
    )
    assert rs.scaling == 8.0 / 4.0


def test_delta_equals_scaled_xab_and_delta_kernel():
    """delta(x) = s (x a) b = x · delta_kernel for a multi-axis kernel [N, H] -> [D]."""
    lin = Linear((4, 8), (16,), axes=(None, None, None), rngs=nnx.Rngs(0))
    ad = L.make_method("lora", rank=3, alpha=6.0).build("p", lin, rngs=nnx.Rngs(1))
    ad.b[...] = _normal(ad.b.shape, 2)
    x = _normal((5, 4, 8), 3)
    w = lin.base_kernel()
    a, b, xn = np.asarray(ad.a[...]), np.asarray(ad.b[...]), np.asarray(x)
    want = 2.0 * (xn.reshape(5, 32) @ a.reshape(32, 3) @ b)
    np.testing.assert_allclose(_delta(ad, x, w), want, rtol=1e-5, atol=1e-5)
    dk = np.asarray(nnx.jit(lambda ad, w: ad.delta_kernel(w))(ad, w))
    np.testing.assert_allclose(np.einsum("bnh,nhd->bd", xn, dk), want, rtol=1e-5, atol=1e-5)


def test_merged_equals_unmerged_and_unmerge_round_trip():
    """merge folds s·BA into every kernel: same logits; unmerge restores W within fp32."""
    m = _model()
    w0 = {p: np.asarray(lin.kernel[...]) for p, lin in L.linear_paths(m).items()}
    _lora(m)
    _randomize_b(m)
    y = np.asarray(_fwd(m, TOK))
    assert np.abs(y - np.asarray(_fwd(_model(), TOK))).max() > 1e-3  # the adapter acts
    assert int(_in_jit(L.merge)(m)) > 0
    np.testing.assert_allclose(np.asarray(_fwd(m, TOK)), y, atol=2e-5)
    _in_jit(L.unmerge)(m)
    for p, lin in L.linear_paths(m).items():
        np.testing.assert_allclose(np.asarray(lin.kernel[...]), w0[p], atol=1e-6)
    np.testing.assert_allclose(np.asarray(_fwd(m, TOK)), y, atol=2e-5)


def test_only_adapter_params_get_gradients_and_count():
    """Grad w.r.t. AdapterParam only: at B = 0, dL/dA = 0 and dL/dB != 0; count = r(in+out)."""
    m = _model()
    paths = _lora(m, targets=r"attn/(q|v)$")
    expect = sum(
        4 * (lin.fan_in + lin.fan_out) for p, lin in L.linear_paths(m).items() if p in paths
    )
    assert L.trainable_count(m) == expect

    def loss(model):
        return jnp.mean(model(TOK) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam)))(m)
    flat = nnx.to_flat_state(grads)
    assert flat and all(isinstance(v, AdapterParam) for _, v in flat)
    names = {"/".join(map(str, k)) for k, _ in flat}
    assert names == {f"{p}/adapter/adapters/default/{f}" for p in paths for f in "ab"}
    for k, v in flat:
        nz = float(jnp.abs(v[...]).max())
        assert (nz == 0.0) if k[-1] == "a" else (nz > 0.0), k


def _two_d(lin):
    return np.asarray(lin.base_kernel(jnp.float32)).reshape(lin.fan_in, lin.fan_out)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_residual_plus_adapter_is_w(init):
    """W_res + s·a·b == W; PiSSA: s·a·b is the top-r SVD truncation; OLoRA: b rows orthonormal."""
    m = _model()
    w0 = {p: _two_d(lin) for p, lin in L.linear_paths(m).items()}
    y0 = np.asarray(_fwd(m, TOK))
    paths = _lora(m, targets=r"layers/0/(attn/q|mlp/down)$", init=init, rank=3)
    for p in paths:
        lin = L.linear_paths(m)[p]
        ad = lin.adapter.adapters["default"]
        lk = np.asarray(ad.lowrank_kernel()).reshape(lin.fan_in, lin.fan_out)
        np.testing.assert_allclose(_two_d(lin) + lk, w0[p], atol=1e-6)
        if init == "pissa":
            u, s, vh = np.linalg.svd(w0[p], full_matrices=False)
            np.testing.assert_allclose(lk, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)
        else:
            b = np.asarray(ad.b[...]).reshape(3, -1)
            np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(np.asarray(_fwd(m, TOK)), y0, atol=1e-5)  # model unchanged


def test_dora_init_is_base_and_merge_round_trip():
    """DoRA m = ||W|| per output at init (model == base); after training-like changes to b and
    m, merged == unmerged and unmerge restores W."""
    m = _model()
    w0 = {p: np.asarray(lin.kernel[...]) for p, lin in L.linear_paths(m).items()}
    y0 = np.asarray(_fwd(m, TOK))
    _lora(m, targets=r"attn/(q|o)$|mlp/up", use_dora=True)
    lin = L.linear_paths(m)["layers/0/attn/o"]
    ad = lin.adapter.adapters["default"]
    assert ad.magnitude.shape == (64,)
    np.testing.assert_allclose(
        ad.magnitude[...], np.linalg.norm(w0["layers/0/attn/o"].reshape(64, 64), axis=0), rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(_fwd(m, TOK)), y0, atol=1e-5)
    _randomize_b(m)
    for l2 in L.linear_paths(m).values():
        if l2.adapter is not None:
            mag = l2.adapter.adapters["default"].magnitude
            noise = np.random.default_rng(9).standard_normal(mag.shape, np.float32)
            mag[...] = jnp.asarray(np.asarray(mag[...]) * (1 + 0.1 * noise))
    y = np.asarray(_fwd(m, TOK))
    assert np.abs(y - y0).max() > 1e-3
    _in_jit(L.merge)(m)
    np.testing.assert_allclose(np.asarray(_fwd(m, TOK)), y, atol=3e-5)
    _in_jit(L.unmerge)(m)
    for p, l2 in L.linear_paths(m).items():
        np.testing.assert_allclose(np.asarray(l2.kernel[...]), w0[p], atol=1e-6)


def test_dora_matches_peft_formula_on_a_matrix():
    """DoRA forward = x · (m / ||W + sBA||_col ⊙ (W + sBA)) (PEFT DoraLinearLayer)."""
    lin = Linear((12,), (10,), axes=(None, None), rngs=nnx.Rngs(0))
    ad = L.make_method("lora", rank=2, alpha=4.0, use_dora=True).build("p", lin, rngs=nnx.Rngs(1))
    ad.b[...] = _normal(ad.b.shape, 2)
    ad.magnitude[...] = jnp.asarray(np.linspace(0.5, 2.0, 10, dtype=np.float32))
    w = np.asarray(lin.base_kernel())
    wp = w + 2.0 * np.asarray(ad.a[...]) @ np.asarray(ad.b[...])
    want_w = np.linspace(0.5, 2.0, 10) / np.linalg.norm(wp, axis=0) * wp
    x = _normal((3, 12), 3)
    xn = np.asarray(x)
    np.testing.assert_allclose(
        xn @ w + np.asarray(_delta(ad, x, lin.base_kernel())), xn @ want_w, atol=1e-5
    )


def test_mla_swiglu_head_bf16_model_fp32_factors():
    """MLA down/up (q_a, kv_a, q_b, k_b, v_b), SwiGLU and the LM head adapt in a bf16 model with
    fp32 factors; B = 0 is the base, and merge == unmerge within bf16 rounding."""
    m = _model("deepseek-tiny", dtype=jnp.bfloat16)
    y0 = np.asarray(_fwd(m, TOK).astype(jnp.float32))
    paths = _lora(m, targets=".*")
    assert {"layers/0/attn/q_a", "layers/0/attn/kv_a", "layers/0/attn/k_b", "lm_head"} <= set(paths)
    ad = L.linear_paths(m)["layers/0/attn/kv_a"].adapter.adapters["default"]
    assert ad.a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(_fwd(m, TOK).astype(jnp.float32)), y0)
    _randomize_b(m)
    y = np.asarray(_fwd(m, TOK).astype(jnp.float32))
    assert np.abs(y - y0).max() > 1e-2
    _in_jit(L.merge)(m)
    ym = np.asarray(_fwd(m, TOK).astype(jnp.float32))
    assert np.abs(ym - y).max() < 0.05 * np.abs(y).max()


def test_dropout_only_with_rng():
    """Dropout on the adapter input acts when ctx.rng is set, is the identity without it."""
    lin = Linear((32,), (16,), axes=(None, None), rngs=nnx.Rngs(0))
    ad = L.make_method("lora", rank=4, dropout=0.5).build("p", lin, rngs=nnx.Rngs(1))
    ad.b[...] = jnp.ones(ad.b.shape)
    x = jnp.ones((4, 32))
    w = lin.base_kernel()
    plain = ad.delta(x, None, base=w)
    ctx = Context.create(4, 1, rng=jax.random.key(0))
    dropped = ad.delta(x, ctx, base=w)
    np.testing.assert_allclose(ad.delta(x, Context.create(4, 1), base=w), plain)
    assert np.abs(np.asarray(dropped - plain)).max() > 1e-3


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(rank=0), r"layers/0/attn/q.*rank must be an int >= 1"),
        (dict(rank=65), r"layers/0/attn/q.*rank=65 exceeds min\(fan_in, fan_out\)=64"),
        (dict(init="svd"), r"init must be one of"),
        (dict(dropout=1.0), r"dropout"),
        (dict(ranks=2), r"no field"),
    ],
)
def test_bad_config_errors(opts, match):
    """Bad method fields raise ValueError naming the field and the path."""
    m = _model()
    with pytest.raises(ValueError, match=match):
        _lora(m, targets=r"layers/0/attn/q$", **opts)


def test_sharded_2x2x2_equals_unsharded():
    """Adapter factors placed by their logical axes (rank replicated) on a 2x2x2 mesh give the
    unsharded logits within 1e-5 (LoRA + DoRA on every projection of the MLA model)."""
    from jaxattn import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    model = _model("deepseek-tiny")
    _lora(model, targets=".*", use_dora=True)
    _randomize_b(model)
    tokens = np.random.default_rng(4).integers(0, 256, (4, 8)).astype(np.int32)
    want = _fwd(model, tokens)
    explicit = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.sharding.Mesh(explicit.devices, explicit.axis_names, axis_types=auto)
    graphdef, state = nnx.split(model)
    placed = []
    for path, var in nnx.to_flat_state(state):
        spec = sharding.logical_sharding(var.get_metadata()["out_sharding"], mesh)
        placed.append((path, var.replace(jax.device_put(var[...], spec))))
    assert any(
        isinstance(v, AdapterParam) and len(v[...].sharding.device_set) > 1 for _, v in placed
    )
    with jax.set_mesh(mesh):
        got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(nnx.from_flat_state(placed), tokens)
    np.testing.assert_allclose(got, want, atol=1e-5)
