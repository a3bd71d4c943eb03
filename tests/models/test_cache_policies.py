"""Per-layer cache configs end to end: decoding past a full cache (issue 12 item 3), sink +
window rings in mha and mla layers, mixed models under generate, num_v_heads (issue 13)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

from jaxattn import dot_product_attention
from jaxattn.cache import CacheConfig
from jaxattn.generate import generate
from jaxattn.layers import Attention, AttentionConfig, Context, MLAConfig, MultiHeadLatentAttention
from jaxattn.masks import SinkWindow
from jaxattn.ops.rope import RopeConfig
from models import DecoderLM, LayerSpec, get_config
from train.config import config_from_json, config_to_json

RING = CacheConfig(policy="sink_window", sink=2, window=5)


@nnx.jit(static_argnums=2)
def _prefill_then_steps(layer, x_BTD, prefill):
    cache = layer.init_cache(x_BTD.shape[0], 16, jnp.float32)  # a ring ignores the capacity
    first, cache = layer.decode(x_BTD[:, :prefill], cache)

    def step(cache, x_B1D):
        out, cache = layer.decode(x_B1D[:, None], cache)
        return cache, out[:, 0]

    cache, rest = jax.lax.scan(step, cache, jnp.swapaxes(x_BTD[:, prefill:], 0, 1))
    return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], 1), cache


@nnx.jit(static_argnums=2)
def _reference(layer, x_BTD, mask):
    """The layer's own stages over the whole input with the op's mask replaced by ``mask``."""
    ctx = Context.create(*x_BTD.shape[:2])
    q, kv = layer.qk_transform(*layer.project(x_BTD, ctx), ctx)
    args = dict(layer.attention_args(ctx), mask=mask)
    o = dot_product_attention(*layer.attention_inputs(q, kv, ctx), **args)
    return layer.out(layer.head_gate(o, ctx), ctx)


_MHA = dict(d_model=32, num_heads=4, num_kv_heads=2, rope=RopeConfig())
_MLA = dict(
    d_model=32, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=8, rope=RopeConfig(),
)  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        lambda c: Attention(AttentionConfig(**_MHA, cache=c), rngs=nnx.Rngs(0)),
        lambda c: MultiHeadLatentAttention(MLAConfig(**_MLA, cache=c), rngs=nnx.Rngs(0)),
    ],
    ids=["mha", "mla"],
)
def test_ring_layers_decode_as_the_sink_window_mask_far_past_the_window(make):
    layer = make(RING)
    x = jax.random.normal(jax.random.key(1), (2, 24, 32))  # 24 positions, 7 slots
    got, cache = _prefill_then_steps(layer, x, 6)
    want = _reference(layer, x, SinkWindow(sinks=RING.sink, window=RING.window))
    np.testing.assert_allclose(got, want, atol=3e-5)
    assert jax.tree.leaves(cache)[0].shape[1] == RING.sink + RING.window
    assert cache.lengths_B.tolist() == [24, 24]


def test_num_v_heads_trains_and_decodes_as_the_full_forward():
    cfg = AttentionConfig(**_MHA, num_v_heads=1, v_head_dim=6)
    layer = Attention(cfg, rngs=nnx.Rngs(0))
    assert layer.v.kernel.shape == (32, 1, 6) and layer.k.kernel.shape == (32, 2, 8)
    x = jax.random.normal(jax.random.key(2), (2, 9, 32))
    full = nnx.jit(lambda m, x: m(x))(layer, x)
    got, cache = _prefill_then_steps(layer, x, 4)
    np.testing.assert_allclose(got, full, atol=3e-5)
    assert cache.bytes_per_token() == (2 * 8 + 1 * 6) * 4
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
    assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match=r"num_v_heads=3 must divide the query heads \(4\)"):
        AttentionConfig(**_MHA, num_v_heads=3)


@pytest.mark.parametrize("name", ["llama-tiny", "deepseek-tiny"])
def test_decoding_past_a_full_cache_is_an_error_not_wrong_logits(name):
    model = DecoderLM(get_config(name, num_layers=1), rngs=nnx.Rngs(0))
    tokens = jnp.arange(1, 17)[None]
    with pytest.raises(ValueError, match="16 new tokens .* capacity=8"):
        model.decode(tokens, model.init_cache(1, 8))
    with pytest.raises(ValueError, match="16 new tokens .* capacity=8"):
        nnx.jit(lambda m, t: m.decode(t, m.init_cache(1, 8)))(model, tokens)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, c, t: nnx.merge(graphdef, s).decode(t, c))
    _, cache = step(state, model.init_cache(1, 8), tokens[:, :8])
    with pytest.raises(ValueError, match=r"lengths_B=\[8\] plus \[1\] new tokens .*capacity=8"):
        model.decode(tokens[:, 8:9], cache)
    err, (logits, after) = checkify.checkify(step)(state, cache, tokens[:, 8:9])
    with pytest.raises(checkify.JaxRuntimeError, match="cache overflow.*capacity=8"):
        err.throw()
    # what an unchecked program returns too: NaN logits, never silently wrong ones
    assert np.isnan(logits).all() and after[0].lengths_B.tolist() == [9]


def test_mixed_ring_and_full_model_generates_consistently():
    specs = (LayerSpec.of("mha", cache=CacheConfig(policy="sink_window", sink=2, window=6)),
             LayerSpec.of("mha"))  # fmt: skip
    mixed = DecoderLM(get_config("llama-tiny", layer_specs=specs), rngs=nnx.Rngs(0))
    prompt, lens = jnp.array([[5, 6, 7, 8], [9, 10, 0, 0]]), jnp.array([4, 2])
    out = generate(mixed, prompt, lens, max_new_tokens=12, rng=jax.random.key(0))
    seq = out.tokens_BS[:1, :15]
    # the full forward is causal in every layer: tokens sampled at positions < 8 (what the
    # ring holds) are its argmax
    full = nnx.jit(lambda m, t: m(t))(mixed, seq)
    np.testing.assert_array_equal(np.argmax(full[0, 3:8], -1), out.tokens_BS[0, 4:9])
    # past the window, step-wise generation agrees with one prefill of the generated sequence
    logits, caches = nnx.jit(lambda m, t: m.decode(t, m.init_cache(1, 16)))(mixed, seq)
    np.testing.assert_array_equal(np.argmax(logits[0, 3:], -1), out.tokens_BS[0, 4:16])
    assert caches[0].k_BCKH.shape[1] == 8 and caches[1].k_BCKH.shape[1] == 16
    with pytest.raises(ValueError, match="generate: prompt length 4 .*capacity 10 is too small"):
        generate(mixed, prompt, lens, max_new_tokens=12, rng=jax.random.key(0), capacity=10)
    ring_only = DecoderLM(get_config("llama-tiny", num_layers=1, cache=RING), rngs=nnx.Rngs(0))
    out = generate(ring_only, prompt, lens, max_new_tokens=12, rng=jax.random.key(0), capacity=1)
    assert out.lengths_B.tolist() == [16, 14]


def test_cache_configs_round_trip_through_checkpoint_json():
    c = get_config(
        "llama-tiny",
        cache=CacheConfig(dtype="bfloat16"),
        layer_specs=(LayerSpec.of("mha", cache=RING), LayerSpec.of("mha")),
    )
    assert c.layer_attention_config(0).cache == RING
    assert c.layer_attention_config(1).cache == CacheConfig(dtype="bfloat16")
    assert config_from_json(json.loads(json.dumps(config_to_json(c)))) == c


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            dict(name="deepseek-tiny", cache=CacheConfig(format="dense")),
            r"layer 0 \('mla'\): MLAConfig cannot serve cache.format='dense'",
        ),
        (
            dict(name="mistral-tiny", cache=RING),
            r"layer 0 \('mha'\): AttentionConfig: cache.policy='sink_window' with sliding_window",
        ),
        (dict(name="llama-tiny", cache={"policy": "full"}), "cache must be a .*CacheConfig"),
        (
            dict(name="llama-tiny", layer_specs=(LayerSpec.of(cache=3), LayerSpec.of())),
            r"layer 0 \('mha'\): AttentionConfig.cache must be a jaxattn.cache.CacheConfig",
        ),
    ],
    ids=["mla_dense", "window_ring", "model_dict", "spec_int"],
)
def test_a_cache_config_a_kind_cannot_serve_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        get_config(kw.pop("name"), **kw)
