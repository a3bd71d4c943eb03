"""Hook points q, k, v, z, out and the residual stream: interventions against equivalent weight
edits and stream identities, run_with_cache, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hooks_testlib import forward, model_of, run, tokens

from jaxattn import heads


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_scaling_z_heads_equals_scaling_the_output_projection(kind):
    model = model_of(kind)
    toks = tokens()
    scales_N = jnp.array([0.0, 0.5, 1.0, 2.0])
    hooks = [
        heads.scale_heads("blocks.1.attn.z", scales_N),
        heads.Capture("blocks.1.attn.z"),
        heads.Capture("blocks.1.attn.out"),
    ]
    got, caps = run(model, toks, hooks)
    edited = nnx.clone(model)
    o = edited.layers[1].attn.o
    o.kernel[...] = o.kernel[...] * scales_N[:, None, None]  # kernel [N, V, D]
    np.testing.assert_allclose(got, forward(edited, toks), atol=1e-5)
    # z is what the output projection reads: out = Σ_n z_n · W_o[n]
    z = caps["blocks.1.attn.z"]
    assert z.shape == (2, 8, 4, o.kernel.shape[1])
    assert float(jnp.abs(z[:, :, 0]).max()) == 0.0
    out = jnp.einsum("btnv,nvd->btd", z, model.layers[1].attn.o.kernel[...])
    np.testing.assert_allclose(caps["blocks.1.attn.out"], out, atol=1e-5)


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_qkv_and_residual_interventions(kind):
    model = model_of(kind)
    toks = tokens()
    base = forward(model, toks)
    watch = [heads.Capture(f"blocks.1.{p}") for p in ("resid_pre", "attn.out", "resid_mid")]
    zero_v = heads.Intervene("blocks.1.attn.v", lambda v, ctx: v * 0)
    double = {p: heads.Intervene(f"blocks.0.attn.{p}", lambda x, ctx: x * 2) for p in "qk"}
    with_q, caps = run(model, toks, [double["q"], zero_v, *watch])
    with_k, _ = run(model, toks, [double["k"], zero_v])
    # the logits see q·k only: doubling q or k is the same edit
    np.testing.assert_allclose(with_q, with_k, atol=1e-5)
    assert not np.allclose(with_q, base, atol=1e-3)
    assert float(jnp.abs(caps["blocks.1.attn.out"]).max()) == 0.0  # zero values: no output
    np.testing.assert_array_equal(caps["blocks.1.resid_mid"], caps["blocks.1.resid_pre"])
    if kind == "mla":
        return  # the residual stream is the same Block code for every kind
    # the residual stream between blocks is one value under two names
    delta_D = jax.random.normal(jax.random.key(3), (64,))
    add = lambda name: heads.Intervene(name, lambda x, ctx: x + delta_D.astype(x.dtype))  # noqa: E731
    pre, _ = run(model, toks, [add("blocks.1.resid_pre")])
    post, _ = run(model, toks, [add("blocks.0.resid_post")])
    np.testing.assert_array_equal(pre, post)
    assert not np.allclose(pre, base, atol=1e-3)


def test_run_with_cache_names_and_layouts():
    model = model_of("mha")
    toks = tokens()
    graphdef, state = nnx.split(model)

    @jax.jit
    def cache(state, toks):
        m = nnx.merge(graphdef, state)
        everything = heads.run_with_cache(m, toks)
        some = heads.run_with_cache(m, toks, ["blocks.*.attn.z", "blocks.0.resid_pre"])
        filtered = heads.run_with_cache(m, toks, lambda n: n.endswith("mlp.out"))
        return everything, some, filtered

    (logits, caps), (_, some), (_, filtered) = cache(state, toks)
    np.testing.assert_allclose(logits, forward(model, toks), atol=1e-5)
    assert sorted(caps) == sorted(heads.hook_names(model))  # every point (jit sorts dict keys)
    c = model.config
    shapes = {
        "resid_pre": (2, 8, 64),
        "attn.q": (2, 8, 4, 16),
        "attn.k": (2, 8, c.num_kv_heads, 16),
        "attn.v": (2, 8, c.num_kv_heads, 16),
        "attn.scores": (2, 4, 8, 8),
        "attn.pattern": (2, 4, 8, 8),
        "attn.z": (2, 8, 4, 16),
        "attn.out": (2, 8, 64),
        "resid_mid": (2, 8, 64),
        "mlp.out": (2, 8, 64),
        "resid_post": (2, 8, 64),
    }
    assert {n.split(".", 2)[2]: v.shape for n, v in caps.items() if n.startswith("blocks.1")} == (
        shapes
    )
    assert sorted(some) == ["blocks.0.attn.z", "blocks.0.resid_pre", "blocks.1.attn.z"]
    assert sorted(filtered) == ["blocks.0.mlp.out", "blocks.1.mlp.out"]
    np.testing.assert_array_equal(some["blocks.1.attn.z"], caps["blocks.1.attn.z"])
    np.testing.assert_array_equal(caps["blocks.0.resid_post"], caps["blocks.1.resid_pre"])


def _trace(model, hooks, t=8, b=2, **kw):
    """Trace ``run_with_hooks`` only (errors are raised at trace time; nothing compiles)."""
    toks = jax.ShapeDtypeStruct((b, t), jnp.int32)
    return jax.eval_shape(lambda x: heads.run_with_hooks(model, x, hooks, **kw), toks)


def test_bad_hooks_get_clear_errors():
    model = model_of("mha")
    with pytest.raises(
        ValueError,
        match=r"unknown hook point 'blocks.0.attn.patern'.*"
        r"blocks.0.attn.pattern",
    ):
        heads.run_with_hooks(model, tokens(), [heads.Capture("blocks.0.attn.patern")])
    with pytest.raises(ValueError, match=r"'blocks.7.attn.q'.*i in 0..1"):
        heads.run_with_cache(model, tokens(), ["blocks.7.attn.q"])
    with pytest.raises(ValueError, match="unknown hook point 'blocks.*.attn.w'"):
        heads.hook_set(model, [heads.Capture("blocks.*.attn.w")])
    with pytest.raises(ValueError, match="heads= / positions= select rows"):
        heads.hook_set(model, [heads.Capture("blocks.0.attn.z", heads=1)])
    with pytest.raises(ValueError, match="two captures of hook point 'blocks.1.attn.z'"):
        heads.hook_set(model, [heads.Capture("blocks.*.attn.z"), heads.Capture("blocks.1.attn.z")])
    with pytest.raises(ValueError, match="Capture or Intervene"):
        heads.hook_set(model, ["blocks.0.attn.z"])
    with pytest.raises(ValueError, match="heads: index 4 is out of range for size 4"):
        _trace(model, [heads.Capture("blocks.0.attn.pattern", heads=[0, 4])])
    with pytest.raises(ValueError, match="positions: index -9 is out of range for size 8"):
        _trace(model, [heads.Capture("blocks.0.attn.pattern", positions=-9)])
    with pytest.raises(ValueError, match="has no head axis"):
        heads.scale_heads("blocks.0.resid_pre", jnp.ones(4))
    with pytest.raises(ValueError, match=r"scales must have shape \[4\]"):
        _trace(model, [heads.scale_heads("blocks.0.attn.z", jnp.ones(3))])


def test_interventions_must_keep_shape_and_dtype():
    model = model_of("mla")
    bad_shape = heads.Intervene("blocks.0.attn.z", lambda z, ctx: z[..., :1])
    with pytest.raises(
        ValueError,
        match=r"at 'blocks.0.attn.z' must return float32\[2, 8, 4, 16\]"
        r".*got float32\[2, 8, 4, 1\]",
    ):
        _trace(model, [bad_shape])
    bad_dtype = heads.Intervene("blocks.1.attn.pattern", lambda p, ctx: p.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"'blocks.1.attn.pattern' must return float32.*bfloat16"):
        _trace(model, [bad_dtype])
    with pytest.raises(ValueError, match="returned float, not an array"):
        _trace(model, [heads.Intervene("blocks.0.resid_mid", lambda x, ctx: 1.0)])


def test_pattern_of_a_long_context_is_refused_with_its_size():
    model = model_of("mha", max_seq_len=4096)
    # every head and row of 2 x 4096 x 4096: 512 MiB, refused at trace time (nothing runs)
    with pytest.raises(
        ValueError,
        match=r"heads=4 x positions=4096 x S=4096 float32 = 512.0 "
        r"MiB > max_bytes=256.0 MiB.*max_bytes=None",
    ):
        _trace(model, [heads.Capture("blocks.0.attn.pattern")], t=4096)
    with pytest.raises(ValueError, match="512.0 MiB"):
        jax.eval_shape(lambda t: heads.run_with_cache(model, t), jnp.zeros((2, 4096), jnp.int32))
    # asked for explicitly: a few rows, or the limit lifted
    out = _trace(model, [heads.Capture("blocks.0.attn.pattern", heads=0, positions=[-1])], t=4096)
    assert out[1]["blocks.0.attn.pattern"].shape == (2, 1, 1, 4096)
    out = _trace(model, [heads.Capture("blocks.0.attn.pattern", max_bytes=None)], t=4096)
    assert out[1]["blocks.0.attn.pattern"].shape == (2, 4, 4096, 4096)


def test_direct_model_call_sows_captures_and_a_standalone_layer_has_bare_points():
    from jaxattn.layers import AttentionConfig, Context

    model = model_of("mha")
    toks = tokens()
    hooks = heads.hook_set(model, [heads.Capture("blocks.1.attn.z")])
    logits = nnx.jit(lambda m, t: m(t, hooks=hooks))(model, toks)  # nnx.jit carries the sown state
    caps = heads.pop_captures(model)
    assert list(caps) == ["blocks.1.attn.z"] and caps["blocks.1.attn.z"].shape == (2, 8, 4, 16)
    assert heads.pop_captures(model) == {}  # popped: the model is back to its parameters
    np.testing.assert_allclose(logits, forward(model, toks), atol=1e-5)

    layer = AttentionConfig(d_model=32, num_heads=4).build(rngs=nnx.Rngs(0))
    assert heads.hook_names(layer) == heads.ATTN_POINTS
    x = jax.random.normal(jax.random.key(0), (1, 5, 32))
    hooks = heads.hook_set(
        layer, [heads.Capture("attn.pattern", positions=[4]), heads.Capture("attn.z")]
    )

    @nnx.jit
    def call(layer, x):
        return layer(x, Context.create(1, 5, hooks=hooks))

    call(layer, x)
    caps = heads.pop_captures(layer)
    assert caps["attn.pattern"].shape == (1, 4, 1, 5) and caps["attn.z"].shape == (1, 5, 4, 8)
    np.testing.assert_allclose(caps["attn.pattern"].sum(-1), 1.0, atol=1e-6)
