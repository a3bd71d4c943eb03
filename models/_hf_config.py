"""Hugging Face ``config.json`` <-> ``ModelConfig`` for Llama, Qwen2, Mistral, DeepSeek-V2/V3.

Field names follow transformers 5 (``rope_parameters``; 4.x ``rope_scaling`` is read too, by
``jaxattn.ops.rope.rope_config_from_hf``). DeepSeek models must be dense (MoE layers raise).
"""

from __future__ import annotations

import dataclasses

from jaxattn.layers import AttentionConfig, MLAConfig
from jaxattn.ops.rope import rope_config_from_hf, rope_config_to_hf
from models.config import ModelConfig

__all__ = ["config_from_hf", "config_to_hf"]

_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "mistral": "mistral",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
}
_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


class _Fields(dict):
    """A config.json dict whose missing required fields raise a ValueError naming them."""

    def __missing__(self, key):
        raise ValueError(
            f"config.json has no {key!r} field, which model_type={self.get('model_type')!r} needs"
        )


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a HF ``config.json`` dict (``overrides``: e.g. dtype, param_dtype).

    Raises:
      ValueError: an unsupported model type, activation, MoE layers or attention bias in MLA,
        or a required field missing (named).
    """
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    hf = _Fields(hf)
    arch = hf.get("model_type")
    if arch not in _MODEL_TYPES:
        raise ValueError(f"model_type={arch!r} is not supported; supported: {list(_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
    d, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    kw = dict(
        arch=arch,
        vocab_size=hf["vocab_size"],
        d_model=d,
        num_layers=layers,
        num_heads=heads,
        mlp_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        max_seq_len=hf.get("max_position_embeddings") or 2048,
    )
    if arch.startswith("deepseek"):
        dense_from = hf.get("first_k_dense_replace") or 0
        if hf.get("n_routed_experts") and dense_from < layers:
            raise ValueError(
                f"{arch}: layers {dense_from}..{layers - 1} are MoE "
                "(n_routed_experts set, first_k_dense_replace < num_hidden_layers); "
                "only dense layers are supported"
            )
        if hf.get("attention_bias"):
            raise ValueError(f"{arch}: attention_bias=True is not supported for MLA")
        p = hf["qk_rope_head_dim"]
        kw |= dict(
            attention="mla",
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=p,
            v_head_dim=hf["v_head_dim"],
            rope=rope_config_from_hf(hf, p),
        )
    else:
        head_dim = hf.get("head_dim") or d // heads
        kw |= dict(
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope=rope_config_from_hf(hf, head_dim),
        )
        bias = bool(hf.get("attention_bias", False))
        kw |= (
            dict(qkv_bias=True, o_bias=False)
            if arch == "qwen2"
            else dict(qkv_bias=bias, o_bias=bias)
        )
        kw |= _sliding_from_hf(hf, arch, layers)
    return ModelConfig(**(kw | overrides))


def _sliding_from_hf(hf: dict, arch: str, layers: int) -> dict:
    window = hf.get("sliding_window")
    if arch == "llama" or window is None or (arch == "qwen2" and not hf.get("use_sliding_window")):
        return {}
    types = hf.get("layer_types")
    if arch == "qwen2" and types is None:
        start = hf.get("max_window_layers", layers)
        types = ["sliding_attention" if i >= start else "full" for i in range(layers)]
    if types is None:
        return dict(sliding_window=window)
    idx = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return dict(sliding_window=window, sliding_window_layers=idx) if idx else {}


def config_to_hf(c: ModelConfig, torch_dtype: str = "float32") -> dict:
    """The HF ``config.json`` dict of ``c`` (its ``arch`` picks the model type).

    Raises:
      ValueError: a feature the HF family cannot hold (named, with the layer where it applies):
        mixed attention kinds, kinds with no HF equivalent, SQA, qk-norm, soft caps, ...
    """
    layers = [c.layer_attention_config(i) for i in range(c.num_layers)]
    kinds = [c.layer_kind(i) for i in range(c.num_layers)]
    if len(set(map(type, layers))) > 1:
        first = {}
        for i, k in enumerate(kinds):
            first.setdefault(k, i)
        raise ValueError(
            f"layers mix attention kinds {first} (kind: first layer); no Hugging Face family "
            "holds mixed attention layers"
        )
    if c.mlp_bias and c.arch != "llama":
        raise ValueError(f"{c.arch} has no MLP biases in HF; mlp_bias=True exports as llama only")
    hf = dict(
        model_type=_MODEL_TYPES[c.arch],
        architectures=[_CLASSES[c.arch]],
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim,
        hidden_act="silu",
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        max_position_embeddings=c.max_seq_len,
        torch_dtype=torch_dtype,
        dtype=torch_dtype,
    )
    if isinstance(layers[0], MLAConfig):
        return hf | _mla_to_hf(c, layers[0])
    if type(layers[0]) is AttentionConfig:  # subclassing kinds (moh, ssa) have no HF form
        return hf | _mha_to_hf(c, layers)
    raise ValueError(
        f"attention kind {kinds[0]!r} ({type(layers[0]).__name__}) has no Hugging Face equivalent"
    )


def _mla_to_hf(c: ModelConfig, a: MLAConfig) -> dict:
    if c.arch not in ("deepseek_v2", "deepseek_v3"):
        raise ValueError(f"arch={c.arch!r} cannot hold MLA layers; use deepseek_v2/v3")
    _check_mla_exportable(c)
    hf = dict(
        num_key_value_heads=a.num_heads,
        q_lora_rank=a.q_lora_rank or None,
        kv_lora_rank=a.kv_lora_rank,
        qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        head_dim=a.qk_rope_head_dim,
        attention_bias=False,
        first_k_dense_replace=c.num_layers,  # every layer dense (no MoE)
    )
    hf |= rope_config_to_hf(a.rope, head_dim=a.qk_rope_head_dim)
    # "interleaved" and "interleaved_to_split_half" pair the same dims (equal q.k).
    paired = a.rope.layout != "split_half"
    if c.arch == "deepseek_v3":
        hf["rope_interleave"] = paired
    elif not paired:
        raise ValueError(
            "deepseek_v2 always interleaves rope pairs; export a split_half "
            "rope layout as arch='deepseek_v3' (rope_interleave=False)"
        )
    return hf


# MLA fields HF DeepSeek cannot hold: (field, its HF-compatible value, why)
_MLA_NOT_IN_HF = (
    ("kv_norm", True, "DeepSeek always RMS-normalises the kv latent (kv_a_layernorm)"),
    ("rope_block_dim", None, "DeepSeek rotates the whole rope key as one head"),
    ("q_bias", False, "DeepSeek's attention_bias has no query-projection bias"),
    ("kv_bias", False, "attention_bias=True is not exported (it also biases q_a and o)"),
    ("softmax_scale", None, "DeepSeek derives the softmax scale from the head dims"),
)


def _check_mla_exportable(c: ModelConfig) -> None:
    """Refuse MLA layers with fields HF DeepSeek cannot hold, or that differ per layer."""
    a = c.layer_attention_config(0)
    for i in range(c.num_layers):
        b = c.layer_attention_config(i)
        bad = [
            f"{f}={getattr(b, f)!r} ({why})" for f, ok, why in _MLA_NOT_IN_HF if getattr(b, f) != ok
        ]
        if b.qk_nope_head_dim == 0:
            bad.append("qk_nope_head_dim=0 (DeepSeek's kv_b_proj needs a key part)")
        if bad:
            raise ValueError(f"layer {i} cannot be exported to {c.arch}: " + "; ".join(bad))
        differ = [f.name for f in dataclasses.fields(b) if getattr(b, f.name) != getattr(a, f.name)]
        if differ:
            raise ValueError(
                f"layer {i} differs from layer 0 in {differ}; HF configs are per model"
            )


def _mha_to_hf(c: ModelConfig, layers: list) -> dict:
    if c.arch.startswith("deepseek"):
        raise ValueError(f"arch={c.arch!r} needs 'mla' attention layers")
    a = layers[0]
    # everything but the window must be the same in every layer: HF configs are per model
    shared = (
        "n_q",
        "n_kv",
        "h",
        "v",
        "qkv_bias",
        "o_bias",
        "qk_norm",
        "logits_soft_cap",
        "rope",
    )
    for i, b in enumerate(layers):
        differ = [f for f in shared if getattr(b, f) != getattr(a, f)]
        if differ:
            raise ValueError(
                f"layer {i} differs from layer 0 in {differ}; HF configs are per model"
            )
    if a.n_q != a.num_heads:
        raise ValueError("SQA models (num_query_heads < num_heads) have no HF equivalent")
    if a.n_v != a.n_kv:
        raise ValueError(
            f"num_v_heads={a.n_v} != num_kv_heads={a.n_kv} has no equivalent in the supported "
            "HF archs"
        )
    if a.qk_norm or a.logits_soft_cap is not None:
        raise ValueError("qk_norm / logits_soft_cap have no equivalent in the supported HF archs")
    if a.v != a.h:  # HF llama / qwen2 / mistral size v_proj and o_proj by the one head_dim
        raise ValueError(
            f"v_head_dim={a.v} != head_dim={a.h} has no equivalent in the supported HF archs"
        )
    if c.arch == "mistral" and (a.qkv_bias or a.o_bias):
        raise ValueError("mistral has no attention biases in HF; export as llama or qwen2")
    hf = dict(num_key_value_heads=a.n_kv, head_dim=a.h)
    if c.arch == "qwen2":
        if not a.qkv_bias or a.o_bias:
            raise ValueError("qwen2 export needs qkv_bias=True and o_bias=False")
    elif a.qkv_bias != a.o_bias:
        raise ValueError(f"{c.arch} export needs qkv_bias == o_bias (HF attention_bias)")
    else:
        hf["attention_bias"] = a.qkv_bias
    hf["mlp_bias"] = c.mlp_bias
    windows = [b.sliding_window for b in layers]
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
        raise ValueError(f"layers use different sliding windows {sizes}; HF holds one size")
    if sizes:
        if c.arch == "llama":
            raise ValueError("llama has no sliding window; export as mistral or qwen2")
        hf["sliding_window"] = sizes[0]
        if c.arch == "qwen2":
            hf["use_sliding_window"] = True
            hf["layer_types"] = [
                "full_attention" if w is None else "sliding_attention" for w in windows
            ]
        elif None in windows:
            raise ValueError("mistral applies the sliding window to every layer")
    elif c.arch == "mistral":
        hf["sliding_window"] = None
    return hf | rope_config_to_hf(a.rope, head_dim=a.h)
