"""Functional core of jaxattn: the attention op, rotary embeddings, sharded kernel wrappers.

Attention
  dot_product_attention, IMPLEMENTATIONS      the op (xla / chunked / decode / pallas / cudnn)
  ChunkedBlockSizes                           tuning of the "chunked" implementation
  DecodeBlockSizes                            tuning of the "decode" implementation
Linear attention (jaxattn.ops.linear_attention)
  linear_attention, LINEAR_VARIANTS           causal linear attention: gates, decays, delta rule
  retention_log_decay                         RetNet's fixed per-head decays
  nala_query_map, nala_key_map                NaLaFormer's norm-aware φ_q, φ_k (feature_map="nala")
Probing (jaxattn.ops.efficient_probing)
  efficient_probing_pool                      Efficient Probing's multi-query cross-attn pooling
Rotary embeddings (jaxattn.ops.rope)
  RopeConfig, apply_rope, rope_frequencies, rope_cos_sin, rope_config_from_hf, rope_config_to_hf
  LinearScaling, DynamicNTKScaling, NTKScaling, Llama3Scaling, YarnScaling, LongRopeScaling
Sharding (jaxattn.ops.sharded)
  shard_attention, sharded_decode_attention   kernels under jax.shard_map from the rules table
"""

from jaxattn.ops.attention import IMPLEMENTATIONS, dot_product_attention
from jaxattn.ops.attention_chunked import ChunkedBlockSizes
from jaxattn.ops.attention_decode import DecodeBlockSizes
from jaxattn.ops.efficient_probing import efficient_probing_pool
from jaxattn.ops.linear_attention import LINEAR_VARIANTS, linear_attention, retention_log_decay
from jaxattn.ops.nala import nala_key_map, nala_query_map
from jaxattn.ops.rope import (
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    NTKScaling,
    RopeConfig,
    YarnScaling,
    apply_rope,
    rope_config_from_hf,
    rope_config_to_hf,
    rope_cos_sin,
    rope_frequencies,
)
from jaxattn.ops.sharded import shard_attention, sharded_decode_attention

__all__ = [
    "IMPLEMENTATIONS",
    "dot_product_attention",
    "ChunkedBlockSizes",
    "DecodeBlockSizes",
    "linear_attention",
    "LINEAR_VARIANTS",
    "retention_log_decay",
    "nala_query_map",
    "nala_key_map",
    "efficient_probing_pool",
    "RopeConfig",
    "apply_rope",
    "rope_frequencies",
    "rope_cos_sin",
    "rope_config_from_hf",
    "rope_config_to_hf",
    "LinearScaling",
    "DynamicNTKScaling",
    "NTKScaling",
    "Llama3Scaling",
    "YarnScaling",
    "LongRopeScaling",
    "shard_attention",
    "sharded_decode_attention",
]
