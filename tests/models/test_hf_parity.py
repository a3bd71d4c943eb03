"""Parity with Hugging Face transformers (torch, CPU, fp32) for every supported architecture.

Each case builds a tiny random HF model (odd dims, rope scaling, sliding windows, biases,
tied embeddings, q-compression on/off), saves it as safetensors and checks: ``from_hf`` logits
== HF logits; ``to_hf`` -> HF reload gives our logits, with no missing/unexpected keys; greedy
``generate`` == HF greedy generation; damaged checkpoints raise errors that list the tensors.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import models  # noqa: E402
from jaxattn.generate import generate  # noqa: E402

VOCAB = 97
TOL = 1e-4


def _hf_config(arch: str):
    common = dict(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    if arch == "llama":  # head_dim decoupled from hidden/heads, llama3 rope, all biases
        return transformers.LlamaConfig(
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=10,
            attention_bias=True,
            rms_norm_eps=1e-5,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            **common,
        )
    if arch == "qwen2":  # MQA, tied embeddings, linear rope, sliding window on layer 1 only
        return transformers.Qwen2Config(
            hidden_size=40,
            intermediate_size=72,
            num_attention_heads=5,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0),
            **common,
        )
    if arch == "mistral":  # GQA, head_dim 14, yarn rope, window 6 on every layer
        return transformers.MistralConfig(
            hidden_size=48,
            intermediate_size=88,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=14,
            sliding_window=6,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=1e4, factor=2.0, original_max_position_embeddings=32
            ),
            **common,
        )
    if arch == "deepseek_v2":  # no q compression, 3 heads, yarn with DeepSeek mscale
        return transformers.DeepseekV2Config(
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=3,
            num_key_value_heads=3,
            q_lora_rank=None,
            kv_lora_rank=12,
            qk_nope_head_dim=6,
            qk_rope_head_dim=4,
            v_head_dim=10,
            first_k_dense_replace=2,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=1e4,
                factor=4.0,
                original_max_position_embeddings=16,
                mscale=0.707,
                mscale_all_dim=0.707,
                beta_fast=32,
                beta_slow=1,
            ),
            **common,
        )
    if arch == "deepseek_v3":  # q compression, interleaved rope weights
        return transformers.DeepseekV3Config(
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=16,
            kv_lora_rank=20,
            qk_nope_head_dim=8,
            qk_rope_head_dim=6,
            v_head_dim=12,
            first_k_dense_replace=2,
            rope_interleave=True,
            rope_parameters=dict(rope_type="default", rope_theta=5000.0),
            **common,
        )
    raise AssertionError(arch)


ARCHS = ["llama", "qwen2", "mistral", "deepseek_v2", "deepseek_v3"]
_CACHE = {}


def _hf_case(arch, tmp_path_factory):
    """(HF model, saved directory), built once per arch."""
    if arch not in _CACHE:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch)).eval()
        with torch.no_grad():  # random norms and biases too, so every tensor matters
            for name, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * 0.15 + (1.0 if "norm" in name else 0.0))
        path = str(tmp_path_factory.mktemp(arch))
        model.save_pretrained(path, safe_serialization=True)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        _CACHE[arch] = (model, path)
    return _CACHE[arch]


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


@nnx.jit
def _ours(model, tokens):
    return model(tokens)


TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 13))


@pytest.mark.parametrize("arch", ARCHS)
def test_from_hf_logits_match(arch, tmp_path_factory):
    hf_model, path = _hf_case(arch, tmp_path_factory)
    ours = models.from_hf(path)
    assert ours.config.arch == arch
    err = np.abs(np.asarray(_ours(ours, jnp.asarray(TOKENS))) - _hf_logits(hf_model, TOKENS))
    assert err.max() <= TOL, err.max()


@pytest.mark.parametrize("arch", ARCHS)
def test_to_hf_reloads_in_transformers(arch, tmp_path_factory, tmp_path):
    _, path = _hf_case(arch, tmp_path_factory)
    ours = models.from_hf(path)
    models.to_hf(ours, str(tmp_path))
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    err = np.abs(_hf_logits(reloaded.eval(), TOKENS) - np.asarray(_ours(ours, jnp.asarray(TOKENS))))
    assert err.max() <= TOL, err.max()
    again = models.from_hf(str(tmp_path))  # and our own export reads back identically
    assert again.config == ours.config


@pytest.mark.parametrize("arch", ["llama", "mistral", "deepseek_v2", "deepseek_v3"])
def test_greedy_generate_matches_transformers(arch, tmp_path_factory):
    hf_model, path = _hf_case(arch, tmp_path_factory)
    ours = models.from_hf(path)
    prompts = [TOKENS[0, :5], TOKENS[1, :9]]  # ragged: one padded batch for us
    padded = np.zeros((2, 9), np.int32)
    padded[0, :5], padded[1, :9] = prompts
    new = 8
    out = generate(ours, padded, np.array([5, 9]), max_new_tokens=new, rng=jax.random.key(0))
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor(prompt[None]), max_new_tokens=new, do_sample=False, min_new_tokens=new
            )[0].numpy()
        n = int(out.lengths_B[b])
        assert n == len(prompt) + new
        np.testing.assert_array_equal(np.asarray(out.tokens_BS[b, :n]), ref)


def _damage(src, dst, edit):
    tensors = safetensors_numpy.load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    safetensors_numpy.save_file(
        tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"}
    )
    with (
        open(os.path.join(src, "config.json")) as f,
        open(os.path.join(dst, "config.json"), "w") as g,
    ):
        g.write(f.read())


def test_bad_checkpoints_list_the_tensors(tmp_path_factory, tmp_path):
    _, path = _hf_case("llama", tmp_path_factory)

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((7, 48), np.float32)

    _damage(path, str(tmp_path), edit)
    with pytest.raises(ValueError) as e:
        models.from_hf(str(tmp_path))
    msg = str(e.value)
    for name in (
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.extra.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ):
        assert name in msg


def test_unsupported_hf_configs_raise(tmp_path_factory, tmp_path):
    _, path = _hf_case("deepseek_v2", tmp_path_factory)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    for change, word in (
        ({"first_k_dense_replace": 1, "n_routed_experts": 4}, "MoE"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt2"}, "model_type"),
    ):
        d = tmp_path / word
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg | change))
        with pytest.raises(ValueError, match=word):
            models.from_hf(str(d))
    with pytest.raises(FileNotFoundError):
        (tmp_path / "nofiles").mkdir()
        (tmp_path / "nofiles" / "config.json").write_text(json.dumps(cfg))
        models.from_hf(str(tmp_path / "nofiles"))


def test_sharded_checkpoint_index_is_read(tmp_path_factory, tmp_path):
    _, path = _hf_case("llama", tmp_path_factory)
    tensors = safetensors_numpy.load_file(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, keys in shards.items():
        safetensors_numpy.save_file(
            {k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"}
        )
        weight_map |= {k: file for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    a, b = models.from_hf(path), models.from_hf(str(tmp_path))
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "name, overrides, word",
    [
        ("llama-tiny", dict(num_query_heads=2), "SQA"),
        ("llama-tiny", dict(sliding_window=8), "sliding window"),
        ("llama-tiny", dict(qk_norm=True), "qk_norm"),
        ("qwen2-tiny", dict(qkv_bias=False), "qwen2"),
        ("llama-tiny", dict(arch="deepseek_v2"), "mla"),
        ("mistral-tiny", dict(qkv_bias=True, o_bias=True), "mistral"),
        ("qwen2-tiny", dict(mlp_bias=True), "mlp_bias"),
        ("deepseek-tiny", dict(rope=models.config.RopeConfig()), "interleave"),
    ],
)
def test_to_hf_rejects_configs_without_hf_equivalent(name, overrides, word):
    from models._hf_config import config_to_hf

    with pytest.raises(ValueError, match=word):
        config_to_hf(models.get_config(name, **overrides))
