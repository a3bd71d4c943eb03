"""jaxattn.layers: Flax NNX modules whose parameters carry logical axis names.

Attention
  AttentionConfig, Attention                      MHA / GQA / MQA / SQA, RoPE, qk-norm, window
  MLAConfig, MultiHeadLatentAttention             DeepSeek MLA, absorbed latent-cache decoding
Feed-forward and normalisation
  SwiGLU                                          gated SiLU MLP
  RMSNorm, rms_norm                               root-mean-square norm
Embeddings
  Embed                                           token table, tied unembedding via ``attend``
"""

from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._embed import Embed
from jaxattn.layers._mla import MLAConfig, MultiHeadLatentAttention
from jaxattn.layers._mlp import SwiGLU
from jaxattn.layers._norm import RMSNorm, rms_norm

__all__ = [
    "AttentionConfig",
    "Attention",
    "MLAConfig",
    "MultiHeadLatentAttention",
    "SwiGLU",
    "RMSNorm",
    "rms_norm",
    "Embed",
]
