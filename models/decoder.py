"""DecoderLM: a pre-norm decoder-only transformer built from jaxattn layers.

block(x) = x + attn(norm(x)); x + mlp(norm(x)), with Attention (MHA / GQA / MQA / SQA) or
MultiHeadLatentAttention per ``ModelConfig.attention`` and a SwiGLU MLP, as in Llama, Qwen2,
Mistral and the dense layers of DeepSeek-V2/V3. ``__call__`` is the training / full forward
pass; ``init_cache`` + ``decode`` run prefill and step-wise decoding over fixed-capacity caches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import sharding
from jaxattn.layers import Attention, Embed, MultiHeadLatentAttention, RMSNorm, SwiGLU
from jaxattn.layers._base import dense, param
from models.config import ModelConfig

__all__ = ["DecoderLM", "Block"]

_ACT = ("batch", "length", "act_embed")


class Block(nnx.Module):
    """One pre-norm transformer block (attention + SwiGLU).

    Args:
      config: the model config.
      layer: the block's index (selects its sliding window).
      rngs: parameter RNGs.
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        pd = c.param_dtype
        self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=pd, rngs=rngs)
        attn_cfg = c.layer_attention_config(layer)
        if c.attention == "mla":
            self.attn = MultiHeadLatentAttention(attn_cfg, rngs=rngs)
        else:
            self.attn = Attention(attn_cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=pd, rngs=rngs)
        self.mlp = SwiGLU(
            c.d_model, c.mlp_dim, use_bias=c.mlp_bias, dtype=c.dtype, param_dtype=pd, rngs=rngs
        )

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT=None):
        """Full forward of one block: x_BTD [B, T, D] -> [B, T, D]."""
        x_BTD = x_BTD + self.attn(
            self.attn_norm(x_BTD), positions_BT=positions_BT, segment_ids_BT=segment_ids_BT
        )
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))

    def decode(self, x_BTD, cache, *, num_new_B=None):
        """Cached forward of one block: returns (x_BTD, cache)."""
        h_BTD, cache = self.attn.decode(self.attn_norm(x_BTD), cache, num_new_B=num_new_B)
        x_BTD = x_BTD + h_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache


class DecoderLM(nnx.Module):
    """Decoder-only language model.

    Args:
      config: a :class:`ModelConfig`.
      rngs: parameter RNGs.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        c = config
        self.config = c
        self.embed = Embed(
            c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs
        )
        self.layers = nnx.List([Block(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=c.param_dtype, rngs=rngs)
        if not c.tie_embeddings:
            self.lm_head_DV = param(
                rngs, (c.d_model, c.vocab_size), ("embed", "vocab"), dtype=c.param_dtype
            )

    def _logits(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        table = self.embed.table_VD[...].T if self.config.tie_embeddings else self.lm_head_DV[...]
        # logits in fp32: the softmax over a large vocabulary needs the precision.
        return dense(x_BTD, table.astype(x_BTD.dtype), preferred_element_type=jnp.float32).astype(
            jnp.float32
        )

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
    ) -> jax.Array:
        """Causal LM forward.

        Args:
          tokens_BT: int tokens [B, T].
          positions_BT: int positions [B, T] (default 0..T-1; restart them per packed segment).
          segment_ids_BT: int [B, T]; tokens attend only within their segment (packing).

        Returns:
          logits_BTV float32 [B, T, vocab].
        """
        tokens_BT = jnp.asarray(tokens_BT)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens_BT must be [batch, length], got shape {tokens_BT.shape}")
        b, t = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x_BTD = sharding.constrain(self.embed(tokens_BT), _ACT)
        for block in self.layers:
            x_BTD = sharding.constrain(
                block(x_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT), _ACT
            )
        return self._logits(x_BTD)

    def init_cache(self, batch: int, capacity: int | None = None, dtype=None) -> tuple:
        """Empty per-layer caches (KVCache or LatentCache), one per block.

        Args:
          batch: B.
          capacity: slots per sequence (default ``config.max_seq_len``).
          dtype: storage dtype (default the compute dtype).

        Returns:
          A tuple of caches (a pytree usable as a ``jax.lax.while_loop`` carry).
        """
        capacity = self.config.max_seq_len if capacity is None else capacity
        dtype = self.config.dtype if dtype is None else dtype
        return tuple(blk.attn.init_cache(batch, capacity, dtype) for blk in self.layers)

    def decode(
        self, tokens_BT: jax.Array, cache: tuple, *, num_new_B: jax.Array | None = None
    ) -> tuple[jax.Array, tuple]:
        """Run T new tokens per sequence against the caches (prefill or one decode step).

        Token t of sequence b takes position ``cache[0].lengths_B[b] + t``.

        Args:
          tokens_BT: int tokens [B, T]; right padding allowed when ``num_new_B`` is given.
          cache: the tuple from ``init_cache`` (or a previous ``decode``).
          num_new_B: valid new tokens per sequence (default T).

        Returns:
          (logits_BTV float32, caches advanced by num_new_B).
        """
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        x_BTD = self.embed(jnp.asarray(tokens_BT))
        new_cache = []
        for block, layer_cache in zip(self.layers, cache, strict=True):
            x_BTD, layer_cache = block.decode(x_BTD, layer_cache, num_new_B=num_new_B)
            new_cache.append(layer_cache)
        return self._logits(x_BTD), tuple(new_cache)

    def cache_bytes_per_token(self, dtype=None) -> int:
        """Cache bytes one token costs across all layers, for storage ``dtype``."""
        dtype = self.config.dtype if dtype is None else dtype
        return sum(blk.attn.init_cache(1, 1, dtype).bytes_per_token() for blk in self.layers)
