"""Named model configs: tiny ones for tests and the training default, real-size ones for import.

``get_config(name, **overrides)`` returns the named ``ModelConfig`` with ``overrides`` applied
(validated again); ``list_configs()`` lists the names. Real-size configs follow the published
Hugging Face ``config.json`` of each model (DeepSeek-V2-Lite with its MoE layers made dense).
"""

from __future__ import annotations

from jaxattn.ops.rope import Llama3Scaling, RopeConfig, YarnScaling
from models.config import RENAMED_FIELDS, LayerSpec, ModelConfig

__all__ = ["get_config", "list_configs"]


def _llama_tiny() -> dict:
    return dict(
        arch="llama",
        vocab_size=256,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=128,
        norm_eps=1e-5,
        max_seq_len=256,
        rope=RopeConfig(theta=500000.0),
    )


def _qwen2_tiny() -> dict:
    return dict(
        arch="qwen2",
        vocab_size=256,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=128,
        norm_eps=1e-6,
        qkv_bias=True,
        max_seq_len=256,
        rope=RopeConfig(theta=1000000.0),
        tie_embeddings=True,
    )


def _mistral_tiny() -> dict:
    return dict(
        arch="mistral",
        vocab_size=256,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        mlp_dim=128,
        norm_eps=1e-5,
        sliding_window=16,
        max_seq_len=256,
        rope=RopeConfig(theta=10000.0),
    )


def _deepseek_tiny() -> dict:
    return dict(
        arch="deepseek_v2",
        attention="mla",
        vocab_size=256,
        d_model=64,
        num_layers=2,
        num_heads=4,
        mlp_dim=128,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        norm_eps=1e-6,
        max_seq_len=256,
        rope=RopeConfig(theta=10000.0, layout="interleaved"),
    )


def _mla_tiny_default() -> dict:
    # ~3.0M parameters: the training default (byte tokenizer, vocab 256).
    return dict(
        arch="deepseek_v3",
        attention="mla",
        vocab_size=256,
        d_model=256,
        num_layers=4,
        num_heads=4,
        mlp_dim=768,
        q_lora_rank=0,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        norm_eps=1e-6,
        max_seq_len=1024,
        rope=RopeConfig(theta=10000.0, layout="interleaved_to_split_half"),
    )


def _linear_hybrid_tiny() -> dict:
    # a hybrid: gated-delta-rule linear attention in layers 0 and 2, GQA softmax in 1 and 3
    return _llama_tiny() | dict(
        num_layers=4,
        layer_pattern=(
            LayerSpec.of("linear", variant="gated_delta_rule", chunk_size=32),
            LayerSpec(),
        ),
    )


def _moh_tiny() -> dict:
    # mixture-of-head attention: 8 query heads, 2 shared + top-3 of 6 routed (5/8 active)
    return _llama_tiny() | dict(
        num_heads=8,
        num_kv_heads=4,
        layer_pattern=(LayerSpec.of("moh", num_shared_heads=2, top_k=3),),
    )


def _ssa_tiny() -> dict:
    # selective self-attention: query/position/value temperatures on llama-tiny's GQA layers
    return _llama_tiny() | dict(attention="ssa")


def _kdgqa_tiny() -> dict:
    # key-driven GQA: 8 query heads split among 2 kv heads by each token's key-head norms
    return _llama_tiny() | dict(num_heads=8, num_kv_heads=2, attention="kdgqa")


def _dgqa_tiny() -> dict:
    # dynamic GQA: 8 query heads split among 2 kv heads by a key-norm EMA tracked in training
    return _llama_tiny() | dict(num_heads=8, num_kv_heads=2, attention="dgqa")


def _pgqa_tiny() -> dict:
    # perturbed GQA: uniform groups of 4 query heads per kv head, moment-matched noise in training
    return _llama_tiny() | dict(num_heads=8, num_kv_heads=2, attention="pgqa")


def _diffqkv_tiny() -> dict:
    # Sigma DiffQKV: 8 query heads, 2 key heads of dim 8, 4 value heads of dim 16, Q augmented
    # to 16 and projected back: the cache holds 2·8 + 4·16 = 80 numbers per token (GQA: 64)
    spec = LayerSpec.of("diffqkv", num_v_heads=4, head_dim=8, v_head_dim=16, augmented_q_dim=16)
    return _llama_tiny() | dict(num_heads=8, num_kv_heads=2, layer_pattern=(spec,))


def _ccgqa_tiny() -> dict:
    # CCGQA: attention in a latent 2x narrower than d_model (32 = 4 heads of 8), 2 kv heads
    return _llama_tiny() | dict(layer_pattern=(LayerSpec.of("cca", compression=2),))


def _lowrank_mhsa_tiny() -> dict:
    # LAMA: 4 heads from a rank-16 affinity against each position's causal context vector
    return _llama_tiny() | dict(layer_pattern=(LayerSpec.of("lowrank_mhsa", rank=16),))


def _head_layouts_tiny() -> dict:
    # every head-layout kind of issue 15 in one model, one per layer, each with its *-tiny
    # layer's heads and fields (the model's default: 8 query heads, 2 kv heads)
    pattern = (
        LayerSpec.of("moh", num_kv_heads=4, num_shared_heads=2, top_k=3),
        LayerSpec.of("ssa", num_heads=4),
        LayerSpec.of("kdgqa"),
        LayerSpec.of("dgqa"),
        LayerSpec.of("pgqa"),
        LayerSpec.of("diffqkv", num_v_heads=4, head_dim=8, v_head_dim=16, augmented_q_dim=16),
        LayerSpec.of("cca", num_heads=4, compression=2),
        LayerSpec.of("lowrank_mhsa", num_heads=4, rank=16),
    )
    return _llama_tiny() | dict(
        num_layers=len(pattern), num_heads=8, num_kv_heads=2, layer_pattern=pattern
    )


def _llama3_8b() -> dict:
    scaling = Llama3Scaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    return dict(
        arch="llama",
        vocab_size=128256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        norm_eps=1e-5,
        max_seq_len=8192,
        rope=RopeConfig(theta=500000.0, scaling=scaling, max_position_embeddings=131072),
    )


def _qwen2_7b() -> dict:
    return dict(
        arch="qwen2",
        vocab_size=152064,
        d_model=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        mlp_dim=18944,
        norm_eps=1e-6,
        qkv_bias=True,
        max_seq_len=32768,
        rope=RopeConfig(theta=1000000.0),
    )


def _mistral_7b() -> dict:
    # Mistral-7B-v0.1: 4096-token sliding window on every layer.
    return dict(
        arch="mistral",
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        norm_eps=1e-5,
        sliding_window=4096,
        max_seq_len=32768,
        rope=RopeConfig(theta=10000.0),
    )


def _deepseek_v2_lite() -> dict:
    # DeepSeek-V2-Lite attention and widths; its MoE layers are replaced by dense MLPs of
    # intermediate_size 10944 (the model's first, dense layer).
    scaling = YarnScaling(
        factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=0.707,
        mscale_all_dim=0.707,
    )
    return dict(
        arch="deepseek_v2",
        attention="mla",
        vocab_size=102400,
        d_model=2048,
        num_layers=27,
        num_heads=16,
        mlp_dim=10944,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        norm_eps=1e-6,
        max_seq_len=163840,
        rope=RopeConfig(
            theta=10000.0, layout="interleaved", scaling=scaling, max_position_embeddings=163840
        ),
    )


_CONFIGS = {
    "llama-tiny": _llama_tiny,
    "qwen2-tiny": _qwen2_tiny,
    "mistral-tiny": _mistral_tiny,
    "deepseek-tiny": _deepseek_tiny,
    "mla-tiny-default": _mla_tiny_default,
    "linear-hybrid-tiny": _linear_hybrid_tiny,
    "moh-tiny": _moh_tiny,
    "ssa-tiny": _ssa_tiny,
    "kdgqa-tiny": _kdgqa_tiny,
    "dgqa-tiny": _dgqa_tiny,
    "pgqa-tiny": _pgqa_tiny,
    "diffqkv-tiny": _diffqkv_tiny,
    "ccgqa-tiny": _ccgqa_tiny,
    "lowrank-mhsa-tiny": _lowrank_mhsa_tiny,
    "head-layouts-tiny": _head_layouts_tiny,
    "llama3-8b": _llama3_8b,
    "qwen2-7b": _qwen2_7b,
    "mistral-7b": _mistral_7b,
    "deepseek-v2-lite": _deepseek_v2_lite,
}


def list_configs() -> list[str]:
    """The names ``get_config`` accepts."""
    return sorted(_CONFIGS)


def get_config(name: str, **overrides) -> ModelConfig:
    """The named :class:`ModelConfig`, with keyword ``overrides`` applied.

    Raises:
      ValueError: an unknown name, an unknown override field, or an invalid result.
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {list_configs()}")
    fields = _CONFIGS[name]()
    unknown = set(overrides) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        renamed = {k: RENAMED_FIELDS[k] for k in unknown if k in RENAMED_FIELDS}
        hint = f" (renamed: {renamed})" if renamed else ""
        raise ValueError(f"unknown ModelConfig fields in overrides: {sorted(unknown)}{hint}")
    return ModelConfig(**(fields | overrides))
