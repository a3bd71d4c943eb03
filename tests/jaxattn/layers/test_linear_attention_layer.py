"""The "linear" attention kind: its recurrent state as a cache, in layers, DecoderLM and generate.

* every variant: the layer's chunked forward == chunked prefill + recurrent decode steps over
  its ``LinearStateCache``;
* a hybrid DecoderLM (``linear-hybrid-tiny``: linear and softmax layers from one config):
  prefill + N decode steps == the full forward, with ragged right-padded prompts;
  greedy ``generate`` == argmax over full forwards; the state's size is independent of the
  context;
* config and input errors name the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.cache import CacheConfig, LinearStateCache
from jaxattn.generate import generate
from jaxattn.layers import LinearAttentionConfig, registered_kinds
from jaxattn.layers._context import Context
from models import DecoderLM, LayerSpec, get_config

TOL = dict(atol=2e-5, rtol=2e-5)
VARIANTS = ("linear_attn", "retention", "simple_gla", "gla", "delta_rule", "gated_delta_rule")


@pytest.fixture(scope="module")
def hybrid():
    """Two of linear-hybrid-tiny's four layers: one "linear", one "mha"."""
    return DecoderLM(get_config("linear-hybrid-tiny", num_layers=2), rngs=nnx.Rngs(0))


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, t)), jnp.int32)


# slow tier for two variants whose layer + cache paths default cases already run: retention
# (fixed decays, normaliser column) in test_ragged_prefill_leaves_padding_out_of_the_state,
# gated_delta_rule (log gate + β) in test_hybrid_prefill_plus_decode_steps_equal_full_forward
# (and the op's prefill + decode in ops/test_linear_attention.py).
_LAYER_VARIANTS = [
    pytest.param(v, marks=pytest.mark.slow) if v in ("retention", "gated_delta_rule") else v
    for v in VARIANTS
]


@pytest.mark.parametrize("variant", _LAYER_VARIANTS)
def test_layer_prefill_and_decode_steps_equal_forward(variant):
    config = LinearAttentionConfig(
        d_model=32, num_heads=4, num_kv_heads=2, variant=variant, chunk_size=4,
        normalize=variant == "linear_attn", feature_map="elu+1" if variant == "linear_attn"
        else "identity",
    )  # fmt: skip
    layer = config.build(rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 32)), jnp.float32)
    full = nnx.jit(lambda m, x: m(x))(layer, x)
    cache = layer.init_cache(2, 0)
    step = nnx.jit(lambda m, x, c: m.decode(x, c))
    assert isinstance(cache, LinearStateCache) and cache.state_BKHV.shape == (2, 2, 8, 8 + (
        variant == "linear_attn"))  # fmt: skip
    o, cache = step(layer, x[:, :6], cache)
    outs = [o]
    for i in range(6, 9):
        o, cache = step(layer, x[:, i : i + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
    np.testing.assert_array_equal(cache.lengths_B, [9, 9])


def test_ragged_prefill_leaves_padding_out_of_the_state():
    """Rows of 9 and 5 valid tokens right-padded to 9, then one step: each row equals the
    forward over its own tokens (retention's fixed decays and the normaliser column, the
    cases the cache rewrites; the hybrid test covers gates and β)."""
    config = LinearAttentionConfig(
        d_model=32, num_heads=2, variant="retention", chunk_size=4, normalize=True,
        feature_map="elu+1",
    )  # fmt: skip
    layer = config.build(rngs=nnx.Rngs(3))
    x = np.random.default_rng(4).normal(size=(2, 10, 32)).astype(np.float32)
    step = nnx.jit(lambda m, x, c, n: m.decode(x, c, num_new_B=n))
    o, cache = step(layer, x[:, :9], layer.init_cache(2, 0), np.array([9, 5]))
    last = np.stack([x[0, 9], x[1, 5]])[:, None]
    o_next, cache = step(layer, last, cache, np.array([1, 1]))
    # one causal forward over x is every row's reference: row 1's own 6 tokens are x[1, :6]
    # (x[1, 5] is its decoded token), the 4 after them are never seen by its positions
    full = np.asarray(_forward(layer, x))  # jitted: eager compiles every op
    o, o_next = np.asarray(o), np.asarray(o_next)
    for b, n in enumerate([9, 5]):
        np.testing.assert_allclose(o[b, :n], full[b, :n], **TOL)
        np.testing.assert_allclose(o_next[b, 0], full[b, n], **TOL)
    np.testing.assert_array_equal(cache.lengths_B, [10, 6])


def test_hybrid_model_is_linear_and_softmax_from_one_config(hybrid):
    c = get_config("linear-hybrid-tiny")
    assert "linear" in registered_kinds()
    assert [c.layer_kind(i) for i in range(c.num_layers)] == ["linear", "mha", "linear", "mha"]
    assert c.layer_attention_config(2).variant == "gated_delta_rule"
    assert type(hybrid.layers[0].attn).__name__ == "LinearAttention"
    assert type(hybrid.layers[1].attn).__name__ == "Attention"


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


@nnx.jit
def _decode(model, tokens, cache, num_new_B):
    return model.decode(tokens, cache, num_new_B=num_new_B)


def test_hybrid_prefill_plus_decode_steps_equal_full_forward(hybrid):
    """Ragged prompts (lengths 30 and 21, right-padded to 30), then 7 decode steps each; the
    reference is one causal forward over 37 tokens (row b's first n_b logits are its own)."""
    tokens = np.asarray(_tokens(2, 37))
    lengths = np.array([30, 21])
    cache = hybrid.init_cache(2, 64)
    logits, cache = _decode(hybrid, tokens[:, :30], cache, lengths)
    logits = np.asarray(logits)
    steps = [[logits[b, : lengths[b]]] for b in range(2)]
    for i in range(7):  # numpy inputs and outputs: no eager op compiles in the loop
        step = tokens[np.arange(2), lengths + i][:, None]
        logits, cache = _decode(hybrid, step, cache, np.ones(2, np.int32))
        logits = np.asarray(logits)
        for b in range(2):
            steps[b].append(logits[b])
    full = np.asarray(_forward(hybrid, tokens))
    for b in range(2):
        n = lengths[b] + 7
        np.testing.assert_allclose(np.concatenate(steps[b], axis=0), full[b, :n], **TOL)
    np.testing.assert_array_equal(cache[0].lengths_B, lengths + 7)


def test_greedy_generate_equals_argmax_of_full_forwards(hybrid):
    prompt = _tokens(2, 6, seed=3)
    lengths = np.array([6, 4])
    out = generate(hybrid, prompt, jnp.asarray(lengths), max_new_tokens=4, rng=jax.random.key(0))
    # both rows in one [2, 37] forward per token (causal: the zero padding after a row's
    # tokens is unseen; 37 is the hybrid test's length, so the compile is shared)
    seq = np.zeros((2, 37), np.int32)
    for b, n in enumerate(lengths):
        seq[b, :n] = np.asarray(prompt)[b, :n]
    for i in range(4):
        logits = np.asarray(_forward(hybrid, seq))
        pos = lengths + i
        seq[np.arange(2), pos] = np.argmax(logits[np.arange(2), pos - 1], axis=-1)
    tokens = np.asarray(out.tokens_BS)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(tokens[b, : n + 4], seq[b, : n + 4])


def test_hybrid_gradients_reach_every_linear_layer_parameter(hybrid):
    """One fwd+bwd of the hybrid model (what training runs; the end-to-end pretrain case is in
    the slow tier): every parameter of the linear layer (q, k, v, o, the gate g and β) gets a
    finite, non-zero gradient."""
    tokens = _tokens(2, 16, seed=5)

    @nnx.jit
    def grads(model, tokens):
        return nnx.grad(lambda m: jnp.sum(jnp.sin(m(tokens))))(model)

    flat = {
        "/".join(map(str, p)): np.asarray(g[...])
        for p, g in nnx.to_flat_state(grads(hybrid, tokens))
    }
    linear = {k: g for k, g in flat.items() if k.startswith("layers/0/attn/")}
    assert {k.split("/")[3] for k in linear} >= {"q", "k", "v", "o", "g", "beta"}, sorted(linear)
    for name, g in linear.items():
        assert np.all(np.isfinite(g)) and np.any(g != 0), name


def test_state_size_is_independent_of_context(hybrid):
    small, large = hybrid.init_cache(1, 16), hybrid.init_cache(1, 4096)
    assert small[0].state_bytes() == large[0].state_bytes() == 2 * 16 * 16 * 4  # K·H·H f32
    assert small[0].bytes_per_token() == 0
    assert hybrid.cache_bytes_per_token() == small[1].bytes_per_token()  # the mha layer's only


def test_bad_config_and_input_name_the_field():
    base = dict(d_model=32, num_heads=4)
    bad = [
        (dict(variant="mamba"), "variant"),
        (dict(variant="delta_rule", normalize=True), "normalize"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(feature_map="tanh"), "feature_map"),
        (dict(implementation="flash"), "implementation"),
        (dict(gate_normalizer=0.0), "gate_normalizer"),
        (dict(cache=CacheConfig(format="dense")), "cache.format"),
        (dict(cache=CacheConfig(policy="sink_window", window=4)), "cache.policy"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            LinearAttentionConfig(**base, **kwargs)
    with pytest.raises(ValueError, match=r"layer 0 \('linear'\).*chunk"):
        get_config(
            "linear-hybrid-tiny", layer_pattern=(LayerSpec.of("linear", chunk=4), LayerSpec())
        )

    def packed(x):  # traced only (eval_shape): no parameter-init or op compiles
        layer = LinearAttentionConfig(**base).build(rngs=nnx.Rngs(0))
        return layer(x, Context.create(1, 4, segment_ids_BT=jnp.zeros((1, 4), jnp.int32)))

    with pytest.raises(NotImplementedError, match="segment_ids"):
        jax.eval_shape(packed, jax.ShapeDtypeStruct((1, 4, 32), jnp.float32))


def test_sharded_forward_over_a_mesh_matches_single_device(hybrid):
    """Parameters placed by the rules table on a data × fsdp × tensor mesh, jitted forward."""
    from jaxattn import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    tokens = _tokens(4, 40, seed=9)
    want = _forward(hybrid, tokens)
    explicit = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    auto = (jax.sharding.AxisType.Auto,) * 3  # XLA propagates shardings (as train/ does)
    mesh = jax.sharding.Mesh(explicit.devices, explicit.axis_names, axis_types=auto)
    graphdef, state = nnx.split(hybrid)
    placed = []
    for path, var in nnx.to_flat_state(state):
        spec = sharding.logical_sharding(var.get_metadata()["out_sharding"], mesh)
        placed.append((path, var.replace(jax.device_put(var[...], spec))))
    assert any(len(v[...].sharding.device_set) > 1 for p, v in placed if "g" in p or "beta" in p)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(nnx.from_flat_state(placed), tokens)
    np.testing.assert_allclose(got, want, atol=2e-5)
