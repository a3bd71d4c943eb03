"""ModelConfig: the frozen, keyword-only hyper-parameters of a ``DecoderLM``.

One config describes Llama / Qwen2 / Mistral style models (kind ``"mha"``: MHA, GQA, MQA or SQA
heads, RoPE, optional q/k/v biases, sliding windows), DeepSeek-V2/V3 style models with dense
MLPs (kind ``"mla"``), and models that mix attention kinds per layer. ``attention`` names the
default kind (any registered in ``jaxattn.layers``); ``layer_specs`` (one per layer) or
``layer_pattern`` (repeated over the layers) give each layer its own kind and fields of that
kind's config (kv heads, window, cache, ...). :meth:`ModelConfig.layer_attention_config` is
the one place a layer's attention config is resolved, its decoding cache included: ``cache``
(a ``jaxattn.cache.CacheConfig``) is every layer's default and ``LayerSpec.of(kind,
cache=CacheConfig(...))`` a layer's own. ``arch`` names the Hugging Face family used by
``models.to_hf``. Every inconsistency raises ValueError naming the field (and the layer) in
``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any

import jax.numpy as jnp

from jaxattn.cache import CacheConfig
from jaxattn.layers import _validate as v
from jaxattn.layers import kind_config
from jaxattn.ops.rope import RopeConfig
from jaxattn.optim.parameterize import DEFAULT_PATHS, SLTRAIN_ALPHA

__all__ = ["ModelConfig", "LayerSpec", "ARCHS", "RENAMED_FIELDS"]

ARCHS = ("llama", "qwen2", "mistral", "deepseek_v2", "deepseek_v3")

# fields that were renamed: old name -> new name (for error messages)
RENAMED_FIELDS = {"attention_impl": "implementation"}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer's attention: a registered kind and fields of that kind's config to set.

    ``LayerSpec.of("mha", num_kv_heads=2, sliding_window=None)`` is an MHA layer with 2 kv
    heads and full attention, whatever the model-level fields say; unset fields come from the
    model config (``<Kind>Config.from_model``).

    Attributes:
      kind: a registered kind name (None: the model's ``attention``).
      overrides: ``(field, value)`` pairs of the kind's config.
    """

    kind: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, kind: str | None = None, **overrides) -> LayerSpec:
        """A spec of ``kind`` with keyword ``overrides``."""
        return cls(kind=kind, overrides=tuple(sorted(overrides.items())))

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(tuple(p) for p in self.overrides))
        for pair in self.overrides:
            if len(pair) != 2 or not isinstance(pair[0], str):
                raise ValueError(f"LayerSpec.overrides must be (field, value) pairs, got {pair!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only LM hyper-parameters.

    Attributes:
      arch: Hugging Face family for export: one of ``ARCHS``.
      vocab_size, d_model, num_layers, mlp_dim: V, D, layers, F.
      num_heads: nominal query heads; num_kv_heads: K (default num_heads);
      head_dim: H (default d_model // num_heads); num_query_heads: SQA query heads.
      attention: the default attention kind of every layer ("mha", "mla", or any registered).
      layer_specs: one :class:`LayerSpec` per layer (None: every layer is ``attention``).
      layer_pattern: specs repeated over the layers (layer i uses ``pattern[i % len]``);
        num_layers must be a multiple of its length. At most one of the two is set.
      q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA dims
        (q_lora_rank 0 = no query compression; L = kv_lora_rank, P = qk_rope_head_dim).
      rope: RoPE config (None: RopeConfig() with theta 10000, full rotary head).
      norm_eps: RMSNorm epsilon of the blocks; latent_norm_eps: of the MLA latent norms.
      qkv_bias, o_bias, mlp_bias, qk_norm: optional biases and per-head qk RMSNorm.
      logits_soft_cap: attention logit soft cap (> 0).
      sliding_window: causal window of W keys, on ``sliding_window_layers`` (None: all layers).
      attention_dropout: dropout on attention probabilities; residual_dropout: on each block's
        attention and MLP outputs before the residual add. Both in [0, 1), off by default, and
        active only when the model is called with an ``rng`` (training).
      tie_embeddings: unembed with the embedding table.
      max_seq_len: default cache capacity and rope context.
      cache: every layer's decoding cache (``jaxattn.cache.CacheConfig``: format, policy such
        as "sink_window", storage dtype); None: each kind's own format, keeping every token.
        A layer spec's ``cache`` override wins; a config a layer's kind cannot serve raises.
      dtype: compute dtype; param_dtype: parameter dtype; implementation: the attention op's.
      parameterization: how the projections matched by ``parameterization_paths`` store their
        weight for pretraining from scratch (``jaxattn.optim.parameterize``): "dense" (a
        kernel), "lowrank" (B·A), "sltrain" (B·A + a sparse S on a fixed random support) or
        "sst" (U·diag(s)·Vᵀ; train it with the ``sst`` optimizer rule).
      parameterization_rank: r of lowrank / sltrain (None: d_model // 4), the kept spectrum
        of sst (None: full, min(fan_in, fan_out)); at most each matched matrix's smaller side.
      parameterization_paths: regex over the projections' module paths (default: attention
        and MLP projections, not the embedding or the LM head).
      sltrain_density: the fraction of S's entries that are non-zero, in (0, 1).
      sltrain_alpha: sltrain's W = (alpha / r) B·A + S: the numerator of the low-rank term's
        scale (the authors' ``lora_alpha``; 32, their script's default), > 0.
      sltrain_seed: the seed of S's fixed supports (with each layer's path): part of the
        model config, so a model rebuilt from a checkpoint's config has the same supports
        whatever its parameter seed.
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
    layer_specs: tuple[LayerSpec, ...] | None = None
    layer_pattern: tuple[LayerSpec, ...] | None = None
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
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    cache: CacheConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    implementation: str = "auto"
    parameterization: str = "dense"
    parameterization_rank: int | None = None
    parameterization_paths: str = DEFAULT_PATHS
    sltrain_density: float = 0.03
    sltrain_seed: int = 0
    sltrain_alpha: float = SLTRAIN_ALPHA

    def __post_init__(self):
        o = "ModelConfig"
        self._check_parameterization()
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} must be one of {ARCHS}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_seq_len"):
            v.check_int(o, name, getattr(self, name))
        for name in ("num_kv_heads", "head_dim", "num_query_heads", "sliding_window"):
            v.check_optional_int(o, name, getattr(self, name))
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
            v.check_int(o, name, getattr(self, name), minimum=0)
        v.check_int(o, "v_head_dim", self.v_head_dim, minimum=0)
        v.check_float(o, "norm_eps", self.norm_eps)
        v.check_float(o, "latent_norm_eps", self.latent_norm_eps)
        v.check_float(o, "logits_soft_cap", self.logits_soft_cap, optional=True)
        v.check_rate(o, "attention_dropout", self.attention_dropout)
        v.check_rate(o, "residual_dropout", self.residual_dropout)
        v.check_dtype(o, "dtype", self.dtype)
        v.check_dtype(o, "param_dtype", self.param_dtype)
        v.check_implementation(o, "implementation", self.implementation)
        kind_config(self.attention)  # an unknown kind lists the registered ones
        if self.cache is not None and not isinstance(self.cache, CacheConfig):
            raise ValueError(
                f"cache must be a jaxattn.cache.CacheConfig or None, got {type(self.cache)}"
            )
        if self.rope is None:
            object.__setattr__(self, "rope", RopeConfig())
        if not isinstance(self.rope, RopeConfig):
            raise ValueError(f"rope must be a RopeConfig, got {type(self.rope).__name__}")
        if self.sliding_window_layers is not None:
            object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers))
            bad = [i for i in self.sliding_window_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(
                    f"sliding_window_layers has indices {bad} outside "
                    f"[0, num_layers={self.num_layers})"
                )
        self._check_specs()
        for layer in range(self.num_layers):  # every layer's config validates its own fields
            self.layer_attention_config(layer)

    def _check_parameterization(self):
        from jaxattn.layers import registered_forms

        forms = ("dense", *registered_forms())
        if self.parameterization not in forms:
            close = difflib.get_close_matches(str(self.parameterization), forms, n=2)
            raise ValueError(
                f"parameterization={self.parameterization!r} is not one of {forms}"
                + (f"; did you mean {close}?" if close else "")
            )
        v.check_optional_int("ModelConfig", "parameterization_rank", self.parameterization_rank)
        try:
            re.compile(self.parameterization_paths)
        except (re.error, TypeError) as err:
            raise ValueError(
                f"parameterization_paths={self.parameterization_paths!r} is not a regex: {err}"
            ) from None
        v.check_int("ModelConfig", "sltrain_seed", self.sltrain_seed, minimum=0)
        if not (isinstance(self.sltrain_density, float) and 0.0 < self.sltrain_density < 1.0):
            raise ValueError(f"sltrain_density={self.sltrain_density!r} must be a float in (0, 1)")
        alpha = self.sltrain_alpha
        real = isinstance(alpha, float | int) and not isinstance(alpha, bool)
        if not real or not 0 < alpha < math.inf:
            raise ValueError(f"sltrain_alpha={alpha!r} must be a finite number > 0")

    @property
    def resolved_parameterization_rank(self) -> int | None:
        """``parameterization_rank``, or its default (d_model // 4; sst: None, full)."""
        if self.parameterization_rank is not None or self.parameterization == "sst":
            return self.parameterization_rank
        return max(1, self.d_model // 4)

    def _check_specs(self):
        if self.layer_specs is not None and self.layer_pattern is not None:
            raise ValueError("set layer_specs (one per layer) or layer_pattern, not both")
        for name in ("layer_specs", "layer_pattern"):
            specs = getattr(self, name)
            if specs is None:
                continue
            specs = tuple(specs)
            object.__setattr__(self, name, specs)
            bad = [i for i, s in enumerate(specs) if not isinstance(s, LayerSpec)]
            if bad or not specs:
                raise ValueError(f"{name} must be a non-empty tuple of LayerSpec (bad: {bad})")
        if self.layer_specs is not None and len(self.layer_specs) != self.num_layers:
            n = len(self.layer_specs)
            missing = (
                f"; layers {list(range(n, self.num_layers))} have none"
                if n < self.num_layers
                else ""
            )
            raise ValueError(f"layer_specs has {n} specs for num_layers={self.num_layers}{missing}")
        if self.layer_pattern is not None and self.num_layers % len(self.layer_pattern):
            n = len(self.layer_pattern)
            raise ValueError(
                f"layer_pattern of {n} specs does not tile num_layers={self.num_layers} "
                f"(layers {list(range(self.num_layers - self.num_layers % n, self.num_layers))} "
                "would be covered by a partial repeat)"
            )

    def layer_spec(self, layer: int) -> LayerSpec:
        """The :class:`LayerSpec` of block ``layer`` (a default one when none is set)."""
        if self.layer_specs is not None:
            return self.layer_specs[layer]
        if self.layer_pattern is not None:
            return self.layer_pattern[layer % len(self.layer_pattern)]
        return LayerSpec()

    def layer_kind(self, layer: int) -> str:
        """The attention kind name of block ``layer``."""
        return self.layer_spec(layer).kind or self.attention

    def layer_attention_config(self, layer: int):
        """The attention layer config of block ``layer`` (built by its kind's ``from_model``).

        Raises:
          ValueError: an unknown kind, an override that is not a field of the kind's config,
            or an invalid resulting config — the message names the layer.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer={layer} outside [0, num_layers={self.num_layers})")
        spec = self.layer_spec(layer)
        kind = spec.kind or self.attention
        try:
            cls = kind_config(kind)
            config = cls.from_model(self, layer)
            if spec.overrides:
                fields = {f.name for f in dataclasses.fields(cls) if f.init}
                unknown = [k for k, _ in spec.overrides if k not in fields]
                if unknown:
                    close = {k: difflib.get_close_matches(k, fields, n=2) for k in unknown}
                    raise ValueError(
                        f"{unknown} are not fields of {cls.__name__} (close: {close}); "
                        f"fields: {sorted(fields)}"
                    )
                config = dataclasses.replace(config, **dict(spec.overrides))
        except (ValueError, TypeError) as err:
            raise ValueError(f"layer {layer} ({kind!r}): {err}") from None
        return config

    @property
    def resolved_head_dim(self) -> int:
        """H of layer 0 (nope + P for MLA)."""
        c = self.layer_attention_config(0)
        return c.qk_head_dim if hasattr(c, "qk_head_dim") else c.h

    def replace(self, **overrides) -> ModelConfig:
        """A copy with ``overrides`` applied (validated again)."""
        return dataclasses.replace(self, **overrides)
