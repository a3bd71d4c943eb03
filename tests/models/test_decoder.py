"""DecoderLM: cached decoding == full forward, packing, config validation, named configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import DecoderLM, ModelConfig, get_config, list_configs

TINY = {
    "llama-tiny": {},
    "qwen2-tiny": dict(sliding_window=5, sliding_window_layers=(1,)),
    "mistral-tiny": dict(sliding_window=4),
    "deepseek-tiny": {},
    "sqa-gqa": dict(num_query_heads=2, num_kv_heads=1),  # SQA on top of the llama config
}


def _config(name, **kw):
    base = "llama-tiny" if name == "sqa-gqa" else name
    return get_config(base, **(TINY[name] | kw))


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


@nnx.jit(static_argnums=2)
def _prefill_and_steps(model, tokens, prefill_len):
    """Prefill ``prefill_len`` tokens (ragged: row 1 one shorter), then decode one at a time."""
    b, t = tokens.shape
    cache = model.init_cache(b, 32, jnp.float32)
    lens = jnp.array([prefill_len, prefill_len - 1])
    logits0, cache = model.decode(tokens[:, :prefill_len], cache, num_new_B=lens)
    # row 0 feeds positions p..t-1, row 1 positions p-1..t-2 (its first unprefilled token)
    steps_BS = jnp.stack([tokens[0, prefill_len:], tokens[1, prefill_len - 1 : -1]])

    def step(cache, tok_B):
        logits, cache = model.decode(tok_B[:, None], cache)
        return cache, logits[:, 0]

    cache, outs = jax.lax.scan(step, cache, steps_BS.T)
    return logits0, jnp.swapaxes(outs, 0, 1), cache


@pytest.mark.parametrize("name", list(TINY))
def test_prefill_plus_steps_equals_full_forward(name):
    model = DecoderLM(_config(name), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    full = np.asarray(_forward(model, tokens))
    p = 6
    logits0, steps, cache = _prefill_and_steps(model, tokens, p)
    np.testing.assert_allclose(np.asarray(logits0[0]), full[0, :p], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits0[1, : p - 1]), full[1, : p - 1], atol=1e-5)
    # row 0 decoded positions p..11, row 1 positions p-1..10
    np.testing.assert_allclose(np.asarray(steps[0]), full[0, p:], atol=1e-5)
    np.testing.assert_allclose(np.asarray(steps[1]), full[1, p - 1 : -1], atol=1e-5)
    assert [int(x) for x in cache[0].lengths_B] == [12, 11]


def test_packed_segments_equal_separate_sequences():
    model = DecoderLM(_config("deepseek-tiny"), rngs=nnx.Rngs(0))
    a = jax.random.randint(jax.random.key(2), (1, 5), 0, 256)
    b = jax.random.randint(jax.random.key(3), (1, 7), 0, 256)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[0] * 5 + [1] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])

    @nnx.jit
    def run(model):
        return model(packed, positions_BT=pos, segment_ids_BT=seg), model(a), model(b)

    out, out_a, out_b = run(model)
    np.testing.assert_allclose(out[:, :5], out_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], out_b, atol=1e-5)


def test_cache_bytes_per_token():
    gqa = DecoderLM(get_config("llama-tiny"), rngs=nnx.Rngs(0))  # 2 layers, K=2, H=16
    assert gqa.cache_bytes_per_token(jnp.bfloat16) == 2 * (2 * 2 * 16) * 2
    mla = DecoderLM(get_config("deepseek-tiny"), rngs=nnx.Rngs(0))  # L=32, P=8
    assert mla.cache_bytes_per_token(jnp.float32) == 2 * (32 + 8) * 4


def test_named_configs_build_and_tiny_default_size():
    assert set(list_configs()) >= {
        "llama-tiny",
        "qwen2-tiny",
        "mistral-tiny",
        "deepseek-tiny",
        "mla-tiny-default",
        "llama3-8b",
        "qwen2-7b",
        "mistral-7b",
        "deepseek-v2-lite",
    }
    for name in list_configs():
        assert isinstance(get_config(name), ModelConfig)
    cfg = get_config("mla-tiny-default")
    assert cfg.attention == "mla" and cfg.vocab_size == 256
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 1_000_000 <= n <= 5_000_000, n
    big = nnx.eval_shape(lambda: DecoderLM(get_config("llama3-8b"), rngs=nnx.Rngs(0)))
    n8b = sum(x.size for x in jax.tree.leaves(nnx.state(big, nnx.Param)))
    assert 7.9e9 < n8b < 8.1e9, n8b


def test_params_carry_logical_axes():
    model = DecoderLM(get_config("deepseek-tiny"), rngs=nnx.Rngs(0))
    known = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "q_lora", "kv_lora", "norm"}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.ndim and set(axes) <= known, (path, axes)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(num_heads=5), "num_heads"),
        (dict(num_query_heads=3), "num_kv_heads"),
        (dict(num_query_heads=8), "num_query_heads"),
        (dict(head_dim=8, rope=models.config.RopeConfig(rotary_dim=16)), "rotary_dim"),
        (dict(d_model=0), "d_model"),
        (dict(sliding_window_layers=(5,)), "sliding_window_layers"),
        (dict(arch="gpt2"), "arch"),
    ],
)
def test_bad_mha_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        get_config("llama-tiny", **overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(kv_lora_rank=65), "kv_lora_rank"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),
        (dict(rope=models.config.RopeConfig(rotary_dim=4)), "rotary_dim"),
        (dict(num_kv_heads=2), "num_kv_heads"),
    ],
)
def test_bad_mla_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        get_config("deepseek-tiny", **overrides)


def test_get_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown config"):
        get_config("llama-huge")
    with pytest.raises(ValueError, match="not_a_field"):
        get_config("llama-tiny", not_a_field=1)
    with pytest.raises(ValueError, match="config"):
        DecoderLM({"d_model": 4}, rngs=nnx.Rngs(0))


def test_sharded_forward_over_a_mesh_matches_single_device():
    from jaxattn import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    model = DecoderLM(get_config("deepseek-tiny"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (4, 8), 0, 256)
    want = _forward(model, tokens)
    explicit = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    auto = (jax.sharding.AxisType.Auto,) * 3  # XLA propagates shardings (as train/ does)
    mesh = jax.sharding.Mesh(explicit.devices, explicit.axis_names, axis_types=auto)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    placed = []
    for path, var in flat:
        spec = sharding.logical_sharding(var.get_metadata()["out_sharding"], mesh)
        placed.append((path, var.replace(jax.device_put(var[...], spec))))
    sharded = nnx.from_flat_state(placed)
    assert any(len(v[...].sharding.device_set) > 1 for _, v in placed)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(sharded, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-tiny", "deepseek-tiny"])
def test_bf16_compute_decode_tracks_forward(name):
    model = DecoderLM(get_config(name, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 256)
    full = _forward(model, tokens)
    assert full.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(full)))
    _, steps, _ = _prefill_and_steps(model, tokens, 6)
    np.testing.assert_allclose(np.asarray(steps[0]), np.asarray(full[0, 6:]), atol=5e-2)
