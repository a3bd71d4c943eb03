"""ModelConfig: the frozen, keyword-only hyper-parameters of a ``DecoderLM``.

One config describes Llama / Qwen2 / Mistral style models (``attention="mha"``: MHA, GQA, MQA
or SQA heads, RoPE, optional q/k/v biases, sliding windows) and DeepSeek-V2/V3 style models
with dense MLPs (``attention="mla"``). ``arch`` names the Hugging Face family used by
``models.to_hf``. Every inconsistency raises ValueError naming the field in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxattn.layers import AttentionConfig, MLAConfig
from jaxattn.ops.rope import RopeConfig

__all__ = ["ModelConfig", "ARCHS"]

ARCHS = ("llama", "qwen2", "mistral", "deepseek_v2", "deepseek_v3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only LM hyper-parameters.

    Attributes:
      arch: Hugging Face family for export: one of ``ARCHS``.
      vocab_size, d_model, num_layers, mlp_dim: V, D, layers, F.
      num_heads: nominal query heads; num_kv_heads: K (default num_heads);
      head_dim: H (default d_model // num_heads); num_query_heads: SQA query heads.
      attention: "mha" (dense K/V) or "mla" (latent attention; fields below).
      q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA dims
        (q_lora_rank 0 = no query compression; L = kv_lora_rank, P = qk_rope_head_dim).
      rope: RoPE config (None: RopeConfig() with theta 10000, full rotary head).
      norm_eps: RMSNorm epsilon of the blocks; latent_norm_eps: of the MLA latent norms.
      qkv_bias, o_bias, mlp_bias, qk_norm: optional biases and per-head qk RMSNorm.
      logits_soft_cap: attention logit soft cap.
      sliding_window: causal window of W keys, on ``sliding_window_layers`` (None: all layers).
      tie_embeddings: unembed with the embedding table.
      max_seq_len: default cache capacity and rope context.
      dtype: compute dtype; param_dtype: parameter dtype; attention_impl: op implementation.
    """

    arch: str = "llama"
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    num_query_heads: int | None = None
    attention: str = "mha"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope: RopeConfig | None = None
    norm_eps: float = 1e-6
    latent_norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    logits_soft_cap: float | None = None
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} must be one of {ARCHS}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_seq_len"):
            _positive(self, name)
        if self.attention not in ("mha", "mla"):
            raise ValueError(f"attention={self.attention!r} must be 'mha' or 'mla'")
        if self.rope is None:
            object.__setattr__(self, "rope", RopeConfig())
        if not isinstance(self.rope, RopeConfig):
            raise ValueError(f"rope must be a RopeConfig, got {type(self.rope).__name__}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")
        if self.sliding_window_layers is not None:
            object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers))
            bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(
                    f"sliding_window_layers has indices {bad} outside "
                    f"[0, num_layers={self.num_layers})"
                )
        if self.attention == "mha":
            self._check_mha()
        else:
            self._check_mla()
        self.layer_attention_config(0)  # the layer config validates the rest

    def _check_mha(self):
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide d_model={self.d_model} (set head_dim)"
            )
        if self.head_dim is not None:
            _positive(self, "head_dim")
        nq = self.num_query_heads or self.num_heads
        if self.num_query_heads is not None and not 0 < nq <= self.num_heads:
            raise ValueError(f"num_query_heads={nq} must be in [1, num_heads={self.num_heads}]")
        k = self.num_kv_heads or self.num_heads
        if self.num_kv_heads is not None and (k <= 0 or nq % k):
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide the query heads "
                f"({'num_query_heads' if self.num_query_heads else 'num_heads'}"
                f"={nq})"
            )
        h = self.head_dim or self.d_model // self.num_heads
        if (self.rope.rotary_dim or 0) > h:
            raise ValueError(f"rope.rotary_dim={self.rope.rotary_dim} > head_dim={h}")

    def _check_mla(self):
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive(self, name)
        if not 0 < self.kv_lora_rank <= self.d_model:
            raise ValueError(
                f"kv_lora_rank={self.kv_lora_rank} must be in [1, d_model="
                f"{self.d_model}] (the latent compresses the model width)"
            )
        if not 0 <= self.q_lora_rank <= self.d_model:
            raise ValueError(
                f"q_lora_rank={self.q_lora_rank} must be in [0, d_model="
                f"{self.d_model}] (0 = no query compression)"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.rope.rotary_dim not in (None, self.qk_rope_head_dim):
            raise ValueError(
                f"rope.rotary_dim={self.rope.rotary_dim} must equal "
                f"qk_rope_head_dim={self.qk_rope_head_dim} for MLA"
            )
        if self.num_kv_heads not in (None, self.num_heads) or self.num_query_heads is not None:
            raise ValueError("num_kv_heads / num_query_heads do not apply to attention='mla'")
        if self.sliding_window is not None or self.logits_soft_cap is not None:
            raise ValueError("sliding_window / logits_soft_cap are not supported for 'mla'")
        if self.qkv_bias or self.o_bias or self.qk_norm:
            raise ValueError("qkv_bias / o_bias / qk_norm are not supported for 'mla'")

    def layer_sliding_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

    def layer_attention_config(self, layer: int) -> AttentionConfig | MLAConfig:
        """The attention layer config of block ``layer``."""
        common = dict(
            d_model=self.d_model,
            num_heads=self.num_heads,
            rope=self.rope,
            implementation=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.attention == "mla":
            return MLAConfig(
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                latent_norm_eps=self.latent_norm_eps,
                **common,
            )
        return AttentionConfig(
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_query_heads=self.num_query_heads,
            qk_norm=self.qk_norm,
            qkv_bias=self.qkv_bias,
            o_bias=self.o_bias,
            logits_soft_cap=self.logits_soft_cap,
            sliding_window=self.layer_sliding_window(layer),
            norm_eps=self.norm_eps,
            **common,
        )

    @property
    def resolved_head_dim(self) -> int:
        """H for MHA; nope + P for MLA."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.d_model // self.num_heads

    def replace(self, **overrides) -> ModelConfig:
        """A copy with ``overrides`` applied (validated again)."""
        return dataclasses.replace(self, **overrides)


def _positive(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")
