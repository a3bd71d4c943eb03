"""Hugging Face ``config.json`` <-> ``ModelConfig`` for Llama, Qwen2, Mistral, DeepSeek-V2/V3.

Field names follow transformers 5 (``rope_parameters``; 4.x ``rope_scaling`` is read too, by
``jaxattn.ops.rope.rope_config_from_hf``). DeepSeek models must be dense (MoE layers raise).
"""

from __future__ import annotations

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


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a HF ``config.json`` dict (``overrides``: e.g. dtype, param_dtype).

    Raises:
      ValueError: an unsupported model type, activation, MoE layers or attention bias in MLA.
    """
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
    """The HF ``config.json`` dict of ``c`` (its ``arch`` picks the model type)."""
    if c.num_query_heads not in (None, c.num_heads):
        raise ValueError("SQA models (num_query_heads < num_heads) have no HF equivalent")
    if c.mlp_bias and c.arch != "llama":
        raise ValueError(f"{c.arch} has no MLP biases in HF; mlp_bias=True exports as llama only")
    if c.arch == "mistral" and (c.qkv_bias or c.o_bias):
        raise ValueError("mistral has no attention biases in HF; export as llama or qwen2")
    if c.qk_norm or c.logits_soft_cap is not None:
        raise ValueError("qk_norm / logits_soft_cap have no equivalent in the supported HF archs")
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
    if c.attention == "mla":
        if c.arch not in ("deepseek_v2", "deepseek_v3"):
            raise ValueError(f"arch={c.arch!r} cannot hold MLA layers; use deepseek_v2/v3")
        hf |= dict(
            num_key_value_heads=c.num_heads,
            q_lora_rank=c.q_lora_rank or None,
            kv_lora_rank=c.kv_lora_rank,
            qk_nope_head_dim=c.qk_nope_head_dim,
            qk_rope_head_dim=c.qk_rope_head_dim,
            v_head_dim=c.v_head_dim,
            head_dim=c.qk_rope_head_dim,
            attention_bias=False,
            first_k_dense_replace=c.num_layers,
        )  # every layer dense (no MoE)
        hf |= rope_config_to_hf(c.rope, head_dim=c.qk_rope_head_dim)
        # "interleaved" and "interleaved_to_split_half" pair the same dims (equal q.k).
        paired = c.rope.layout != "split_half"
        if c.arch == "deepseek_v3":
            hf["rope_interleave"] = paired
        elif not paired:
            raise ValueError(
                "deepseek_v2 always interleaves rope pairs; export a split_half "
                "rope layout as arch='deepseek_v3' (rope_interleave=False)"
            )
        return hf
    if c.arch.startswith("deepseek"):
        raise ValueError(f"arch={c.arch!r} needs attention='mla'")
    a = c.layer_attention_config(0)
    hf |= dict(num_key_value_heads=a.n_kv, head_dim=a.h)
    if c.arch == "qwen2":
        if not c.qkv_bias or c.o_bias:
            raise ValueError("qwen2 export needs qkv_bias=True and o_bias=False")
    elif c.qkv_bias != c.o_bias:
        raise ValueError(f"{c.arch} export needs qkv_bias == o_bias (HF attention_bias)")
    else:
        hf["attention_bias"] = c.qkv_bias
    hf["mlp_bias"] = c.mlp_bias
    if c.sliding_window is not None:
        if c.arch == "llama":
            raise ValueError("llama has no sliding window; export as mistral or qwen2")
        layers = range(c.num_layers) if c.sliding_window_layers is None else c.sliding_window_layers
        hf["sliding_window"] = c.sliding_window
        if c.arch == "qwen2":
            hf["use_sliding_window"] = True
            hf["layer_types"] = [
                "sliding_attention" if i in layers else "full_attention"
                for i in range(c.num_layers)
            ]
        elif len(layers) != c.num_layers:
            raise ValueError("mistral applies the sliding window to every layer")
    elif c.arch == "mistral":
        hf["sliding_window"] = None
    hf |= rope_config_to_hf(c.rope, head_dim=a.h)
    return hf
