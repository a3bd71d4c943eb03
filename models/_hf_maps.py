"""Hugging Face <-> jaxattn translation tables: config.json fields and per-tensor rules.

A rule ties HF tensor names to parameter paths of a ``DecoderLM`` with the two conversions
between them (HF ``nn.Linear`` weights are [out, in]; ours are [in, ..., out] with heads split
out). Used by ``models.hf``; supports Llama, Qwen2, Mistral and DeepSeek-V2/V3 dense layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxattn.ops.rope import rope_config_from_hf, rope_config_to_hf
from models.config import ModelConfig

__all__ = ["Rule", "rules", "config_from_hf", "config_to_hf", "HF_IGNORED_SUFFIXES"]

HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some exports keep
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


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensors ``hf`` (with shapes ``hf_shapes``) <-> our parameter ``paths``."""

    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    paths: tuple[tuple, ...]
    to_ours: Callable  # (*hf arrays) -> tuple of our arrays
    to_hf: Callable  # (*our arrays) -> tuple of hf arrays


def _linear(hf: str, path: tuple, d_in: int, out_shape: tuple[int, ...]) -> Rule:
    """HF weight [prod(out), in] <-> ours [in, *out]."""
    n_out = int(np.prod(out_shape))
    return Rule(
        (hf,),
        ((n_out, d_in),),
        (path,),
        lambda w: (w.T.reshape(d_in, *out_shape),),
        lambda p: (p.reshape(d_in, n_out).T,),
    )


def _out_proj(hf: str, path: tuple, in_shape: tuple[int, ...], d_out: int) -> Rule:
    """HF weight [out, prod(in)] <-> ours [*in, out]."""
    n_in = int(np.prod(in_shape))
    return Rule(
        (hf,),
        ((d_out, n_in),),
        (path,),
        lambda w: (w.T.reshape(*in_shape, d_out),),
        lambda p: (p.reshape(n_in, d_out).T,),
    )


def _same(hf: str, path: tuple, shape: tuple[int, ...]) -> Rule:
    return Rule(
        (hf,),
        (shape,),
        (path,),
        lambda w: (w.reshape(shape),),
        lambda p: (p.reshape(-1) if len(shape) == 1 else p,),
    )


def _bias(hf: str, path: tuple, shape: tuple[int, ...]) -> Rule:
    n = int(np.prod(shape))
    return Rule((hf,), ((n,),), (path,), lambda w: (w.reshape(shape),), lambda p: (p.reshape(n),))


def _kv_b(hf: str, base: tuple, n: int, nope: int, v: int, l: int) -> Rule:
    """kv_b_proj [N·(nope+V), L] <-> k_b [L, N, nope] and v_b [L, N, V]."""

    def to_ours(w):
        w_NXL = w.reshape(n, nope + v, l)
        return w_NXL[:, :nope].transpose(2, 0, 1), w_NXL[:, nope:].transpose(2, 0, 1)

    def to_hf(k_b, v_b):
        w_NXL = np.concatenate(
            [np.asarray(k_b).transpose(1, 2, 0), np.asarray(v_b).transpose(1, 2, 0)], axis=1
        )
        return (w_NXL.reshape(n * (nope + v), l),)

    return Rule(
        (hf,), ((n * (nope + v), l),), (base + ("k_b_LNH",), base + ("v_b_LNV",)), to_ours, to_hf
    )


def _attention_rules(c: ModelConfig, i: int) -> list[Rule]:
    hf, ours = f"model.layers.{i}.self_attn.", ("layers", i, "attn")
    d, n = c.d_model, c.num_heads
    if c.attention == "mla":
        qk, l, p = c.qk_nope_head_dim + c.qk_rope_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
        out = []
        if c.q_lora_rank:
            q = c.q_lora_rank
            out += [
                _linear(hf + "q_a_proj.weight", ours + ("q_a_DQ",), d, (q,)),
                _same(hf + "q_a_layernorm.weight", ours + ("q_norm", "scale"), (q,)),
                _linear(hf + "q_b_proj.weight", ours + ("q_b_QNH",), q, (n, qk)),
            ]
        else:
            out.append(_linear(hf + "q_proj.weight", ours + ("q_DNH",), d, (n, qk)))
        return out + [
            _linear(hf + "kv_a_proj_with_mqa.weight", ours + ("kv_a_DR",), d, (l + p,)),
            _same(hf + "kv_a_layernorm.weight", ours + ("kv_norm", "scale"), (l,)),
            _kv_b(hf + "kv_b_proj.weight", ours, n, c.qk_nope_head_dim, c.v_head_dim, l),
            _out_proj(hf + "o_proj.weight", ours + ("o_NVD",), (n, c.v_head_dim), d),
        ]
    a = c.layer_attention_config(i)
    out = [
        _linear(hf + "q_proj.weight", ours + ("q_DNH",), d, (a.n_q, a.h)),
        _linear(hf + "k_proj.weight", ours + ("k_DKH",), d, (a.n_kv, a.h)),
        _linear(hf + "v_proj.weight", ours + ("v_DKV",), d, (a.n_kv, a.v)),
        _out_proj(hf + "o_proj.weight", ours + ("o_NVD",), (a.n_q, a.v), d),
    ]
    if c.qkv_bias:
        out += [
            _bias(hf + "q_proj.bias", ours + ("q_bias_NH",), (a.n_q, a.h)),
            _bias(hf + "k_proj.bias", ours + ("k_bias_KH",), (a.n_kv, a.h)),
            _bias(hf + "v_proj.bias", ours + ("v_bias_KV",), (a.n_kv, a.v)),
        ]
    if c.o_bias:
        out.append(_bias(hf + "o_proj.bias", ours + ("o_bias_D",), (d,)))
    if c.qk_norm:
        out += [
            _same(hf + "q_norm.weight", ours + ("q_norm", "scale"), (a.h,)),
            _same(hf + "k_norm.weight", ours + ("k_norm", "scale"), (a.h,)),
        ]
    return out


def rules(c: ModelConfig) -> list[Rule]:
    """Every tensor of a HF checkpoint of config ``c``, with its conversion."""
    d, f = c.d_model, c.mlp_dim
    out = [
        _same("model.embed_tokens.weight", ("embed", "table_VD"), (c.vocab_size, d)),
        _same("model.norm.weight", ("final_norm", "scale"), (d,)),
    ]
    if not c.tie_embeddings:
        out.append(_out_proj("lm_head.weight", ("lm_head_DV",), (d,), c.vocab_size))
    for i in range(c.num_layers):
        pre, ours = f"model.layers.{i}.", ("layers", i)
        out += [
            _same(pre + "input_layernorm.weight", ours + ("attn_norm", "scale"), (d,)),
            _same(pre + "post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (d,)),
            _linear(pre + "mlp.gate_proj.weight", ours + ("mlp", "gate_DF"), d, (f,)),
            _linear(pre + "mlp.up_proj.weight", ours + ("mlp", "up_DF"), d, (f,)),
            _out_proj(pre + "mlp.down_proj.weight", ours + ("mlp", "down_FD"), (f,), d),
        ]
        if c.mlp_bias:
            out += [
                _bias(pre + "mlp.gate_proj.bias", ours + ("mlp", "gate_bias_F"), (f,)),
                _bias(pre + "mlp.up_proj.bias", ours + ("mlp", "up_bias_F"), (f,)),
                _bias(pre + "mlp.down_proj.bias", ours + ("mlp", "down_bias_D"), (d,)),
            ]
        out += _attention_rules(c, i)
    return out


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
        if c.arch == "deepseek_v3":
            hf["rope_interleave"] = c.rope.layout == "interleaved_to_split_half"
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
