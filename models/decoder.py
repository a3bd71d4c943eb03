"""DecoderLM: a pre-norm decoder-only transformer built from jaxattn layers.

block(x) = x + drop(attn(norm(x))); x + drop(mlp(norm(x))), with each block's attention built
from its resolved kind config (``ModelConfig.layer_attention_config``: "mha", "mla" or any
registered kind) and a SwiGLU MLP, as in Llama, Qwen2, Mistral and the dense layers of
DeepSeek-V2/V3. ``__call__`` is the training / full forward pass; ``init_cache`` + ``decode``
run prefill and step-wise decoding over fixed-capacity caches. A
``jaxattn.layers.Context`` carries positions, segments, per-sequence ids and the rng from the
model through every block to every ``Linear``, with the active hooks (``hooks=``; see
``jaxattn.heads``): points ``blocks.<i>.resid_pre``, ``.resid_mid``, ``.mlp.out``,
``.resid_post`` here and ``blocks.<i>.attn.*`` in each attention layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import heads, sharding
from jaxattn.layers import Context, Embed, Linear, RMSNorm, SwiGLU, dropout
from jaxattn.layers._embed import check_tokens, poison_after_invalid
from jaxattn.layers._kinds import hook_point
from jaxattn.optim.parameterize import parameterize
from models.config import ModelConfig

__all__ = ["DecoderLM", "Block"]

_ACT = ("batch", "length", "act_embed")
_ATTN_DROP, _MLP_DROP = 2, 3  # ctx.key sites of the residual dropouts


class Block(nnx.Module):
    """One pre-norm transformer block (attention of the layer's kind + SwiGLU).

    Args:
      config: the model config.
      layer: the block's index (selects its attention kind and fields).
      rngs: parameter RNGs.
    """

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        pd = c.param_dtype
        self.layer = layer
        self.residual_dropout = c.residual_dropout
        self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=pd, rngs=rngs)
        self.attn = c.layer_attention_config(layer).build(rngs=rngs)
        self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=pd, rngs=rngs)
        self.mlp = SwiGLU(
            c.d_model, c.mlp_dim, use_bias=c.mlp_bias, dtype=c.dtype, param_dtype=pd, rngs=rngs
        )

    def _drop(self, h_BTD, ctx: Context, tag: int):
        return dropout(
            h_BTD, self.residual_dropout, ctx.key(tag) if self.residual_dropout else None
        )

    def _mlp_half(self, x_BTD, ctx: Context):
        x_BTD = hook_point(self, ctx, "resid_mid", x_BTD)
        h_BTD = hook_point(self, ctx, "mlp.out", self.mlp(self.mlp_norm(x_BTD), ctx))
        return hook_point(self, ctx, "resid_post", x_BTD + self._drop(h_BTD, ctx, _MLP_DROP))

    def __call__(self, x_BTD, ctx: Context):
        """Full forward of one block: x_BTD [B, T, D] -> [B, T, D]."""
        ctx = ctx.at_layer(self.layer)
        x_BTD = hook_point(self, ctx, "resid_pre", x_BTD)
        x_BTD = x_BTD + self._drop(self.attn(self.attn_norm(x_BTD), ctx), ctx, _ATTN_DROP)
        return self._mlp_half(x_BTD, ctx)

    def decode(self, x_BTD, cache, ctx: Context, *, num_new_B=None):
        """Cached forward of one block: returns (x_BTD, cache)."""
        ctx = ctx.at_layer(self.layer)
        x_BTD = hook_point(self, ctx, "resid_pre", x_BTD)
        h_BTD, cache = self.attn.decode(self.attn_norm(x_BTD), cache, ctx, num_new_B=num_new_B)
        return self._mlp_half(x_BTD + self._drop(h_BTD, ctx, _ATTN_DROP), ctx), cache


class DecoderLM(nnx.Module):
    """Decoder-only language model.

    Parameter paths: ``embed/table``, ``layers/<i>/attn_norm/scale``, ``layers/<i>/attn/...``
    (the kind's projections, e.g. ``attn/q/kernel``), ``layers/<i>/mlp/{gate,up,down}/kernel``,
    ``final_norm/scale`` and ``lm_head/kernel`` (absent when tied: the head reads
    ``embed/table``). With ``config.parameterization`` other than "dense", each matched
    projection holds ``<path>/form/...`` factors instead of ``<path>/kernel``.

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
        if c.tie_embeddings:
            self.lm_head = self.embed.as_head()
        else:
            self.lm_head = Linear(
                (c.d_model,),
                (c.vocab_size,),
                axes=("embed", "vocab"),
                param_dtype=c.param_dtype,
                rngs=rngs,
            )
        if c.parameterization != "dense":  # factorised kernels for pretraining from scratch
            parameterize(
                self,
                c.parameterization,
                rank=c.resolved_parameterization_rank,
                paths=c.parameterization_paths,
                density=c.sltrain_density,
                rngs=rngs,
                support_seed=c.sltrain_seed,
                alpha=c.sltrain_alpha,
            )

    def _logits(self, x_BTD: jax.Array, ctx: Context) -> jax.Array:
        x_BTD = self.final_norm(x_BTD)
        # logits in fp32: the softmax over a large vocabulary needs the precision.
        return self.lm_head(x_BTD, ctx, preferred_element_type=jnp.float32).astype(jnp.float32)

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        sequence_ids_B: jax.Array | None = None,
        rng: jax.Array | None = None,
        hooks=(),
    ) -> jax.Array:
        """Causal LM forward.

        Args:
          tokens_BT: int tokens [B, T] in [0, vocab_size). Concrete ids are checked (ValueError);
            under jit an out-of-range id gives NaN logits at its position and at every later
            position of its row, and leaves the other positions and rows as they would be.
          positions_BT: int positions [B, T] (default 0..T-1; restart them per packed segment).
          segment_ids_BT: int [B, T]; tokens attend only within their segment (packing).
          sequence_ids_B: int [B] per-sequence ids (which adapter / task a row uses).
          rng: a PRNG key for dropout (None: deterministic, as in evaluation).
          hooks: ``jaxattn.heads`` hooks (Capture / Intervene, or a HookSet), decided at trace
            time; captures are sown as ``heads.HookCapture`` intermediates on the blocks and
            their attention layers (take them with ``heads.pop_captures(model)``, or use
            ``heads.run_with_hooks``, which does it on a clone).

        Returns:
          logits_BTV float32 [B, T, vocab].
        """
        tokens_BT = check_tokens(tokens_BT, self.config.vocab_size)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens_BT must be [batch, length], got shape {tokens_BT.shape}")
        b, t = tokens_BT.shape
        ctx = Context.create(
            b,
            t,
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            sequence_ids_B=sequence_ids_B,
            rng=rng,
            hooks=heads.hook_set(self, hooks),
        )
        x_BTD = sharding.constrain(self.embed(tokens_BT), _ACT)
        for block in self.layers:
            x_BTD = sharding.constrain(block(x_BTD, ctx), _ACT)
        return poison_after_invalid(self._logits(x_BTD, ctx), tokens_BT, self.config.vocab_size)

    def init_cache(self, batch: int, capacity: int | None = None, dtype=None, cache=None) -> tuple:
        """Empty per-layer caches, one per block: each layer's kind builds the cache its
        resolved ``CacheConfig`` names (``config.cache`` or the layer spec's ``cache``).

        Args:
          batch: B.
          capacity: positions per sequence of the "full" caches (default
            ``config.max_seq_len``); "sink_window" rings hold sink + window slots regardless.
          dtype: storage dtype (default the compute dtype; a ``CacheConfig.dtype`` wins).
          cache: CacheConfig fields set over every layer's own (a dict, e.g. ``{"format":
            "kivi", "bits": 2}``: a storage format on each layer's policy, or a
            ``CacheConfig``: every layer's), or one such entry per layer (a tuple or list of
            len(layers) dicts, ``CacheConfig``s or None: the layer's own; e.g. the per-layer
            calibrated configs of ``models.kv_calibrate.calibrate_kvquant``), or None.

        Returns:
          A tuple of caches (a pytree usable as a ``jax.lax.while_loop`` carry).

        Raises:
          ValueError: a layer cannot serve ``cache`` (the layer and the field named).
        """
        capacity = self.config.max_seq_len if capacity is None else capacity
        dtype = self.config.dtype if dtype is None else dtype
        if cache is None:
            return tuple(blk.attn.init_cache(batch, capacity, dtype) for blk in self.layers)
        per_layer = cache if isinstance(cache, (tuple, list)) else (cache,) * len(self.layers)
        if len(per_layer) != len(self.layers):
            raise ValueError(
                f"cache has {len(per_layer)} per-layer configs, the model {len(self.layers)} layers"
            )
        caches = []
        for i, (blk, layer_cache) in enumerate(zip(self.layers, per_layer, strict=True)):
            try:
                caches.append(blk.attn.init_cache(batch, capacity, dtype, cache=layer_cache))
            except ValueError as err:
                shown = dict(layer_cache) if isinstance(layer_cache, dict) else layer_cache
                raise ValueError(f"layer {i} cache {shown}: {err}") from None
        return tuple(caches)

    def decode(
        self,
        tokens_BT: jax.Array,
        cache: tuple,
        *,
        num_new_B: jax.Array | None = None,
        sequence_ids_B: jax.Array | None = None,
        hooks=(),
    ) -> tuple[jax.Array, tuple]:
        """Run T new tokens per sequence against the caches (prefill or one decode step).

        Token t of sequence b takes position ``cache[i].lengths_B[b] + t`` in every layer.
        Each layer's cache attends over itself (``update_and_attend``) under its policy.

        Args:
          tokens_BT: int tokens [B, T]; right padding allowed when ``num_new_B`` is given.
          cache: the tuple from ``init_cache`` (or a previous ``decode``).
          num_new_B: valid new tokens per sequence (default T).
          sequence_ids_B: int [B] per-sequence ids (as in ``__call__``).
          hooks: ``jaxattn.heads`` hooks, as in ``__call__``; q / k / v capture only (the new
            tokens' naive-layout operands), no ``scores`` / ``pattern`` (the cache owns its
            attention).

        Returns:
          (logits_BTV float32, caches advanced by num_new_B).

        Raises:
          ValueError: a "full" cache would overflow: T > capacity, or concrete lengths past it.
            Under jit the check is a ``checkify.debug_check`` (reported inside
            ``checkify.checkify``), and an overflowing sequence's logits are NaN.
        """
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        tokens_BT = check_tokens(tokens_BT, self.config.vocab_size)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens_BT must be [batch, length], got shape {tokens_BT.shape}")
        b, t = tokens_BT.shape
        ctx = Context.create(b, t, sequence_ids_B=sequence_ids_B, hooks=heads.hook_set(self, hooks))
        x_BTD = self.embed(tokens_BT)
        new_cache = []
        for block, layer_cache in zip(self.layers, cache, strict=True):
            x_BTD, layer_cache = block.decode(x_BTD, layer_cache, ctx, num_new_B=num_new_B)
            new_cache.append(layer_cache)
        logits_BTV = poison_after_invalid(
            self._logits(x_BTD, ctx), tokens_BT, self.config.vocab_size
        )
        return logits_BTV, tuple(new_cache)

    def hf_projections(self) -> tuple[dict[str, str], dict[str, str]]:
        """The Hugging Face module of each projection, for adapter interchange (PEFT).

        Returns:
          ``({HF module: our Linear path}, {HF module: why it has no one-to-one Linear})``,
          e.g. ``"model.layers.0.self_attn.q_proj" -> "layers/0/attn/q"``. A module is named
          only when its checkpoint conversion is exactly ``Wᵀ.reshape(*in, *out)`` (checked
          on an index array), so adapter factors convert by reshapes alone.

        Raises:
          ValueError: a layer whose kind has no HF equivalent (named).
        """
        from models._hf_maps import projections  # the HF tables import this module

        return projections(self.config)

    def cache_bytes_per_token(self, dtype=None) -> int:
        """Cache bytes one token costs across all layers, for storage ``dtype``."""
        dtype = self.config.dtype if dtype is None else dtype
        return sum(blk.attn.init_cache(1, 1, dtype).bytes_per_token() for blk in self.layers)
