"""Attention kinds per layer: the registry, per-layer specs, mixed models end to end."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.layers import Attention, AttentionConfig, register_kind, registered_kinds
from models import DecoderLM, LayerSpec, get_config, to_hf


@dataclasses.dataclass(frozen=True, kw_only=True)
class HalvedHeadsConfig(AttentionConfig):
    """A test-local kind: MHA whose head_gate halves every head's output."""

    def build(self, *, rngs):
        return HalvedHeads(self, rngs=rngs)


class HalvedHeads(Attention):
    def head_gate(self, o_BTNV, ctx, x_BTD=None):
        return o_BTNV * 0.5


register_kind("test_halved", HalvedHeadsConfig)


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _mixed(**kw):
    return get_config(
        "deepseek-tiny",
        arch="deepseek_v3",
        num_layers=4,
        layer_pattern=(
            LayerSpec.of("mla"),
            LayerSpec.of("mha", num_kv_heads=2, sliding_window=3),
            LayerSpec.of("mha", num_kv_heads=1),
            LayerSpec.of("test_halved", num_kv_heads=4),
        ),
        implementation="xla",
        **kw,
    )


def test_mixed_kinds_decode_equals_forward():
    config = _mixed()
    kinds = [type(config.layer_attention_config(i)).__name__ for i in range(4)]
    assert kinds == ["MLAConfig", "AttentionConfig", "AttentionConfig", "HalvedHeadsConfig"]
    assert config.layer_attention_config(1).sliding_window == 3
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 256)
    np.testing.assert_allclose(decode_all(model, tokens), _forward(model, tokens), atol=2e-5)


def test_registered_kind_changes_only_its_stage():
    plain = DecoderLM(get_config("llama-tiny", implementation="xla"), rngs=nnx.Rngs(0))
    halved = DecoderLM(
        get_config("llama-tiny", implementation="xla", attention="test_halved"), rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(2), (1, 5, 64))
    a, b = plain.layers[0].attn, halved.layers[0].attn
    # same parameters (same paths, same init), outputs halved before the o projection
    np.testing.assert_allclose(b(x), a(x) * 0.5, atol=1e-6)
    assert "test_halved" in registered_kinds()


def test_layer_spec_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"layers \[3\] have none"):
        get_config("llama-tiny", num_layers=4, layer_specs=(LayerSpec(),) * 3)
    with pytest.raises(ValueError, match="does not tile num_layers=4"):
        get_config("llama-tiny", num_layers=4, layer_pattern=(LayerSpec(),) * 3)
    with pytest.raises(ValueError, match=r"layer 1 \('mha'\).*num_kv_head.*close"):
        get_config("llama-tiny", layer_specs=(LayerSpec(), LayerSpec.of(num_kv_head=1)))
    with pytest.raises(ValueError, match=r"layer 0 \('gqa'\).*registered: \("):
        get_config("llama-tiny", layer_specs=(LayerSpec.of("gqa"), LayerSpec()))
    with pytest.raises(ValueError, match=r"layer 1 \('mha'\): num_kv_heads=3 must divide"):
        get_config("llama-tiny", layer_specs=(LayerSpec(), LayerSpec.of(num_kv_heads=3)))
    with pytest.raises(ValueError, match="unknown attention kind 'gqa'"):
        get_config("llama-tiny", attention="gqa")
    with pytest.raises(ValueError, match="layer 0 is 'mla'.*num_kv_heads"):
        get_config("deepseek-tiny", num_kv_heads=2)


def test_register_kind_refuses_duplicates_and_non_kinds():
    with pytest.raises(ValueError, match="already registered"):
        register_kind("mha", HalvedHeadsConfig)
    with pytest.raises(ValueError, match="no \\['build', 'from_model'\\]"):
        register_kind("nothing", object)


def test_per_layer_windows_export_to_qwen2_layer_types(tmp_path):
    config = get_config(
        "qwen2-tiny",
        layer_specs=(LayerSpec.of(sliding_window=8), LayerSpec()),
    )
    to_hf(DecoderLM(config, rngs=nnx.Rngs(0)), str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["sliding_window"] == 8
    assert hf["layer_types"] == ["sliding_attention", "full_attention"]


def test_mixed_kinds_refuse_hf_export_naming_the_layers(tmp_path):
    with pytest.raises(ValueError, match=r"mix attention kinds \{'mla': 0, 'mha': 1"):
        to_hf(DecoderLM(_mixed(), rngs=nnx.Rngs(0)), str(tmp_path))
    config = get_config(
        "llama-tiny", layer_specs=(LayerSpec.of(num_kv_heads=1), LayerSpec.of(num_kv_heads=2))
    )
    with pytest.raises(ValueError, match=r"layer 1 differs from layer 0 in \['n_kv'\]"):
        to_hf(DecoderLM(config, rngs=nnx.Rngs(0)), str(tmp_path))


def test_mixed_model_trains_and_resumes_from_its_checkpoint(tmp_path):
    from train import pretrain
    from train.config import TrainConfig
    from train.sample import load_model

    config = TrainConfig(
        name="mixed",
        run_dir=str(tmp_path),
        seq_len=16,
        batch_size=8,
        steps=4,
        warmup_steps=1,
        log_every=2,
        eval_every=4,
        eval_batches=1,
        ckpt_every=2,
        tensorboard=False,
        plot=False,
        sample_tokens=0,
    )
    model_config = get_config(
        "deepseek-tiny",
        arch="deepseek_v3",
        d_model=32,
        mlp_dim=64,
        layer_specs=(LayerSpec.of("mla"), LayerSpec.of("mha", num_kv_heads=2, sliding_window=4)),
        implementation="xla",
    )
    result = pretrain.run(config, model_config=model_config)
    assert np.isfinite(result.eval_loss)
    model, meta = load_model(str(tmp_path))
    assert meta["step"] == 4 and model.config == model_config
    tokens = jax.random.randint(jax.random.key(3), (1, 6), 0, 256)
    trained = result.trainer.model(jax.device_get(result.state["params"]), result.rest)
    np.testing.assert_allclose(_forward(model, tokens), _forward(trained, tokens), atol=1e-6)
