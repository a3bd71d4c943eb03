"""Hugging Face <-> jaxattn per-tensor rules (config.json fields are in ``_hf_config``).

A rule ties HF tensor names to parameter paths of a ``DecoderLM`` with the two conversions
between them (HF ``nn.Linear`` weights are [out, in]; ours are [in, ..., out] with heads split
out). Used by ``models.hf``; supports Llama, Qwen2, Mistral and DeepSeek-V2/V3 dense layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxattn.layers import AttentionConfig, MLAConfig
from models.config import ModelConfig

__all__ = ["Rule", "rules", "projections", "ATTENTION_RULES", "HF_IGNORED_SUFFIXES"]

HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some exports keep


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
        (hf,),
        ((n * (nope + v), l),),
        (base + ("k_b", "kernel"), base + ("v_b", "kernel")),
        to_ours,
        to_hf,
    )


def _mla_rules(c: ModelConfig, a: MLAConfig, hf: str, ours: tuple) -> list[Rule]:
    d, n = c.d_model, a.num_heads
    qk, l, p = a.qk_head_dim, a.kv_lora_rank, a.qk_rope_head_dim
    out = []
    if a.q_lora_rank:
        q = a.q_lora_rank
        out += [
            _linear(hf + "q_a_proj.weight", ours + ("q_a", "kernel"), d, (q,)),
            _same(hf + "q_a_layernorm.weight", ours + ("q_norm", "scale"), (q,)),
            _linear(hf + "q_b_proj.weight", ours + ("q_b", "kernel"), q, (n, qk)),
        ]
    else:
        out.append(_linear(hf + "q_proj.weight", ours + ("q", "kernel"), d, (n, qk)))
    return out + [
        _linear(hf + "kv_a_proj_with_mqa.weight", ours + ("kv_a", "kernel"), d, (l + p,)),
        _same(hf + "kv_a_layernorm.weight", ours + ("kv_norm", "scale"), (l,)),
        _kv_b(hf + "kv_b_proj.weight", ours, n, a.qk_nope_head_dim, a.v_head_dim, l),
        _out_proj(hf + "o_proj.weight", ours + ("o", "kernel"), (n, a.v_head_dim), d),
    ]


def _mha_rules(c: ModelConfig, a: AttentionConfig, hf: str, ours: tuple) -> list[Rule]:
    d = c.d_model
    out = [
        _linear(hf + "q_proj.weight", ours + ("q", "kernel"), d, (a.n_q, a.h)),
        _linear(hf + "k_proj.weight", ours + ("k", "kernel"), d, (a.n_kv, a.h)),
        _linear(hf + "v_proj.weight", ours + ("v", "kernel"), d, (a.n_kv, a.v)),
        _out_proj(hf + "o_proj.weight", ours + ("o", "kernel"), (a.n_q, a.v), d),
    ]
    if a.qkv_bias:
        out += [
            _bias(hf + "q_proj.bias", ours + ("q", "bias"), (a.n_q, a.h)),
            _bias(hf + "k_proj.bias", ours + ("k", "bias"), (a.n_kv, a.h)),
            _bias(hf + "v_proj.bias", ours + ("v", "bias"), (a.n_kv, a.v)),
        ]
    if a.o_bias:
        out.append(_bias(hf + "o_proj.bias", ours + ("o", "bias"), (d,)))
    if a.qk_norm:
        out += [
            _same(hf + "q_norm.weight", ours + ("q_norm", "scale"), (a.h,)),
            _same(hf + "k_norm.weight", ours + ("k_norm", "scale"), (a.h,)),
        ]
    return out


# HF tensor rules of each attention config type (kinds with no HF equivalent are absent)
ATTENTION_RULES = {AttentionConfig: _mha_rules, MLAConfig: _mla_rules}


def _attention_rules(c: ModelConfig, i: int) -> list[Rule]:
    a = c.layer_attention_config(i)
    make = ATTENTION_RULES.get(type(a))
    if make is None:
        raise ValueError(
            f"layer {i} is of kind {c.layer_kind(i)!r} ({type(a).__name__}), which has no "
            "Hugging Face equivalent"
        )
    return make(c, a, f"model.layers.{i}.self_attn.", ("layers", i, "attn"))


def rules(c: ModelConfig) -> list[Rule]:
    """Every tensor of a HF checkpoint of config ``c``, with its conversion.

    Raises:
      ValueError: a layer whose kind has no HF equivalent (named).
    """
    d, f = c.d_model, c.mlp_dim
    out = [
        _same("model.embed_tokens.weight", ("embed", "table"), (c.vocab_size, d)),
        _same("model.norm.weight", ("final_norm", "scale"), (d,)),
    ]
    if not c.tie_embeddings:
        out.append(_out_proj("lm_head.weight", ("lm_head", "kernel"), (d,), c.vocab_size))
    for i in range(c.num_layers):
        pre, ours = f"model.layers.{i}.", ("layers", i)
        mlp = ours + ("mlp",)
        out += [
            _same(pre + "input_layernorm.weight", ours + ("attn_norm", "scale"), (d,)),
            _same(pre + "post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (d,)),
            _linear(pre + "mlp.gate_proj.weight", mlp + ("gate", "kernel"), d, (f,)),
            _linear(pre + "mlp.up_proj.weight", mlp + ("up", "kernel"), d, (f,)),
            _out_proj(pre + "mlp.down_proj.weight", mlp + ("down", "kernel"), (f,), d),
        ]
        if c.mlp_bias:
            out += [
                _bias(pre + "mlp.gate_proj.bias", mlp + ("gate", "bias"), (f,)),
                _bias(pre + "mlp.up_proj.bias", mlp + ("up", "bias"), (f,)),
                _bias(pre + "mlp.down_proj.bias", mlp + ("down", "bias"), (d,)),
            ]
        out += _attention_rules(c, i)
    return out


def projections(c: ModelConfig) -> tuple[dict[str, str], dict[str, str]]:
    """``({HF module: our Linear path}, {HF module: reason refused})`` for config ``c``.

    A rule with one HF ``.weight`` and one ``kernel`` is a projection, accepted only if its
    conversion is exactly ``Wᵀ.reshape(*in, *out)`` (checked on an index array); a HF module
    holding several of our projections (DeepSeek's ``kv_b_proj``) is refused.
    """
    ok, refused = {}, {}
    for rule in rules(c):
        kernels = [p for p in rule.paths if p[-1] == "kernel"]
        if not kernels or not rule.hf[0].endswith(".weight"):
            continue  # norms, embeddings, biases
        module = rule.hf[0][: -len(".weight")]
        if len(rule.hf) != 1 or len(rule.paths) != 1:
            ours = ["/".join(map(str, p[:-1])) for p in kernels]
            refused[module] = f"one HF module holds several projections here ({ours})"
            continue
        shape = rule.hf_shapes[0]
        probe = np.arange(int(np.prod(shape))).reshape(shape)
        (conv,) = rule.to_ours(probe)
        conv = np.asarray(conv)
        if conv.size != probe.size or not np.array_equal(conv, probe.T.reshape(conv.shape)):
            refused[module] = "its HF <-> jaxattn conversion is not a plain reshape"
            continue
        ok[module] = "/".join(map(str, rule.paths[0][:-1]))
    return ok, refused
