"""jaxattn.layers: Flax NNX modules whose parameters carry logical axis names.

Seams (DESIGN.md "Extension points")
  Linear, AdapterParam, Adapter                   every projection; the adapter slot
  KernelForm, factorize, register_form,           factorised kernels in Linear's form slot:
  registered_forms                                ``lowrank``, ``sltrain``, ``lrt``, ``sst``
  Context, dropout                                the call context every layer receives
  AttentionLayer, register_kind, kind_config,     the attention-kind protocol and registry
  registered_kinds
Attention kinds
  AttentionConfig, Attention                "mha": MHA / GQA / MQA / SQA, RoPE, qk-norm, window
  MLAConfig, MultiHeadLatentAttention       "mla": DeepSeek MLA, absorbed latent-cache decoding
  LinearAttentionConfig, LinearAttention    "linear": gated / delta-rule linear attn, state cache
  MoHConfig, MoHAttention                   "moh": mixture-of-head attention (routed heads)
  SSAConfig, SelectiveAttention             "ssa": selective attention (query/value temperatures)
  NSAConfig, NativeSparseAttention          "nsa": native sparse attention (3 gated branches)
  LMInfiniteConfig, LMInfiniteAttention     "lm_infinite": Λ mask + RoPE distance cap
  LandmarkConfig, LandmarkAttention         "landmark": landmark blocks, grouped softmax, top-k
  KDGQAConfig, DGQAConfig, KeyDrivenAttention "kdgqa" / "dgqa": key-norm driven query-head groups
  PGQAConfig, PerturbedAttention            "pgqa": GQA with moment-matched output noise (train)
  DiffQKVConfig, DiffQKVAttention           "diffqkv": Sigma's separate K / V heads and dims, aug. Q
  CCAConfig, CompressedConvAttention        "cca": compressed convolutional attention (CCA / CCGQA)
  LowRankMHSAConfig, LowRankMHSA, lama_pool "lowrank_mhsa": LAMA's low-rank affinity, context query
  LinformerConfig, LinformerAttention       "linformer": sequence-projected K/V (encoder only)
  AgentAttentionConfig, AgentAttention      "agent": agent tokens pooled from Q (encoder only)
Memory layers
  TitansMemoryConfig, TitansMemory          Titans: test-time-trained MLP memory (as a layer)
  S4Config, S4Layer                         S4: HiPPO NPLR state space, Cauchy conv / recurrence
Probes
  EfficientProbeConfig, EfficientProbe      Efficient Probing: multi-query head on frozen tokens
Feed-forward and normalisation
  SwiGLU, swiglu                                  gated SiLU MLP (and its fused activation)
  RMSNorm, rms_norm                               root-mean-square norm
Factorised kernels (pretraining from scratch; by path: jaxattn.optim.parameterize)
  LowRankKernel, SparseLowRankKernel, SpectralKernel, FixedSupport
  SVDLowRankKernel                                LRT (Greenformers): B·A from the truncated SVD
Embeddings
  Embed                                           token table; ``as_head()`` is the tied unembedding
"""

from jaxattn.layers._agent_attention import AgentAttention, AgentAttentionConfig
from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._cca import CCAConfig, CompressedConvAttention
from jaxattn.layers._context import Context, dropout
from jaxattn.layers._diffqkv import DiffQKVAttention, DiffQKVConfig
from jaxattn.layers._efficient_probe import EfficientProbe, EfficientProbeConfig
from jaxattn.layers._embed import Embed
from jaxattn.layers._factorized import (
    FixedSupport,
    KernelForm,
    LowRankKernel,
    SparseLowRankKernel,
    SpectralKernel,
    SVDLowRankKernel,
    factorize,
    register_form,
    registered_forms,
)
from jaxattn.layers._kdgqa import DGQAConfig, KDGQAConfig, KeyDrivenAttention
from jaxattn.layers._kinds import AttentionLayer, kind_config, register_kind, registered_kinds
from jaxattn.layers._lama import LowRankMHSA, LowRankMHSAConfig, lama_pool
from jaxattn.layers._landmark import LandmarkAttention, LandmarkConfig
from jaxattn.layers._linear import Adapter, AdapterParam, Linear
from jaxattn.layers._linear_attention import LinearAttention, LinearAttentionConfig
from jaxattn.layers._linformer import LinformerAttention, LinformerConfig
from jaxattn.layers._lm_infinite import LMInfiniteAttention, LMInfiniteConfig
from jaxattn.layers._mla import MLAConfig, MultiHeadLatentAttention
from jaxattn.layers._mlp import SwiGLU, swiglu
from jaxattn.layers._moh import MoHAttention, MoHConfig
from jaxattn.layers._norm import RMSNorm, rms_norm
from jaxattn.layers._nsa import NativeSparseAttention, NSAConfig
from jaxattn.layers._pgqa import PerturbedAttention, PGQAConfig
from jaxattn.layers._s4 import S4Config, S4Layer
from jaxattn.layers._ssa import SelectiveAttention, SSAConfig
from jaxattn.layers._titans import TitansMemory, TitansMemoryConfig

__all__ = [
    "TitansMemoryConfig",
    "TitansMemory",
    "S4Config",
    "S4Layer",
    "Linear",
    "AdapterParam",
    "Adapter",
    "KernelForm",
    "factorize",
    "register_form",
    "registered_forms",
    "LowRankKernel",
    "SparseLowRankKernel",
    "SVDLowRankKernel",
    "SpectralKernel",
    "FixedSupport",
    "Context",
    "dropout",
    "AttentionLayer",
    "register_kind",
    "kind_config",
    "registered_kinds",
    "AttentionConfig",
    "Attention",
    "MLAConfig",
    "MultiHeadLatentAttention",
    "LinearAttentionConfig",
    "LinearAttention",
    "LinformerConfig",
    "LinformerAttention",
    "AgentAttentionConfig",
    "AgentAttention",
    "EfficientProbeConfig",
    "EfficientProbe",
    "MoHConfig",
    "MoHAttention",
    "SSAConfig",
    "SelectiveAttention",
    "NSAConfig",
    "NativeSparseAttention",
    "LMInfiniteConfig",
    "LMInfiniteAttention",
    "LandmarkConfig",
    "LandmarkAttention",
    "KDGQAConfig",
    "PGQAConfig",
    "PerturbedAttention",
    "DGQAConfig",
    "KeyDrivenAttention",
    "DiffQKVConfig",
    "DiffQKVAttention",
    "CCAConfig",
    "CompressedConvAttention",
    "LowRankMHSAConfig",
    "LowRankMHSA",
    "lama_pool",
    "SwiGLU",
    "swiglu",
    "RMSNorm",
    "rms_norm",
    "Embed",
]
