"""Conversion between ``RopeConfig`` and Hugging Face ``config.json`` dicts (transformers 4.x
and 5 key names).

Private: import ``rope_config_from_hf`` / ``rope_config_to_hf`` from ``jaxattn.ops.rope``.
"""

from __future__ import annotations

import dataclasses
import math

from jaxattn.ops._rope_scaling import (
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    NTKScaling,
    RopeConfig,
    YarnScaling,
    _check_positive,
    _public,
    _resolved_rotary_dim,
)

_HF_FIELDS = {  # our scaling class -> (HF rope_type, dataclass fields written as HF keys)
    LinearScaling: ("linear", ("factor",)),
    DynamicNTKScaling: ("dynamic", ("factor",)),
    Llama3Scaling: (
        "llama3",
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    ),
    YarnScaling: ("yarn", tuple(f.name for f in dataclasses.fields(YarnScaling))),
    LongRopeScaling: ("longrope", tuple(f.name for f in dataclasses.fields(LongRopeScaling))),
}
_HF_OPTIONAL = ("beta_fast", "beta_slow", "truncate")
_MLA_MODEL_TYPES = ("deepseek_v3", "deepseek_v32", "mistral4", "kimi_k2", "kimi_k25")


@_public
def rope_config_from_hf(hf_config: dict, head_dim: int, *, layout: str | None = None) -> RopeConfig:
    """Build a RopeConfig from a HF ``config.json`` dict, resolving keys as transformers 5 does.

    Reads ``rope_scaling`` (wins, as in HF) or ``rope_parameters``; ``rope_theta`` and
    ``partial_rotary_factor`` inside it or at the top level (also GPT-NeoX ``rotary_pct`` and
    GPT-J ``rotary_dim``); ``max_position_embeddings``; Phi-3's top-level
    ``original_max_position_embeddings``. The layout comes from ``model_type``: DeepSeek-V3 /
    Mistral4 style MLA with ``rope_interleave`` (default True) -> "interleaved_to_split_half",
    deepseek_v2 and gptj -> "interleaved", otherwise "split_half". Rope types other than
    default, linear, dynamic, llama3, yarn and longrope (e.g. proportional, mrope) and
    per-layer-type rope_parameters raise ValueError.

    Args:
      hf_config: the parsed config.json.
      head_dim: the rope head size H (for MLA, ``qk_rope_head_dim``).
      layout: overrides the layout inferred from ``model_type``.

    Returns:
      The RopeConfig.
    """
    _check_positive("head_dim", head_dim, integer=True)
    p = dict(hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in p.values()):
        raise ValueError("hf_config: per-layer-type rope_parameters are not supported")
    max_pos = hf_config.get("max_position_embeddings")
    theta = p.get("rope_theta") or hf_config.get("rope_theta") or 10000.0
    factor = p.get("partial_rotary_factor") or hf_config.get("partial_rotary_factor")
    rotary_dim = int(head_dim * (factor or hf_config.get("rotary_pct") or 1.0))
    rotary_dim = hf_config.get("rotary_dim") or rotary_dim  # GPT-J gives it absolute
    rope_type = p.get("rope_type", p.get("type", "default"))
    classes = {hf_type: cls for cls, (hf_type, _) in _HF_FIELDS.items()}
    if rope_type not in classes and rope_type != "default":
        raise ValueError(f"hf_config rope_type {rope_type!r} is not supported")
    scaling = None
    if rope_type != "default":
        cls, keys = classes[rope_type], _HF_FIELDS[classes[rope_type]][1]
        kw = {k: p[k] for k in keys if p.get(k) is not None}
        if "original_max_position_embeddings" in keys:  # a top-level one wins (Phi-3), as in HF
            kw["original_max_position_embeddings"] = hf_config.get(
                "original_max_position_embeddings"
            ) or kw.get("original_max_position_embeddings", max_pos)
        if cls is YarnScaling:  # HF reads `rope_parameters.get("beta_fast") or 32`
            kw = {k: v for k, v in kw.items() if v or k not in ("beta_fast", "beta_slow")}
        scaling = cls(**kw)
    if layout is None:
        model_type = hf_config.get("model_type", "")
        if model_type in _MLA_MODEL_TYPES and hf_config.get("rope_interleave", True):
            layout = "interleaved_to_split_half"
        elif model_type in ("deepseek_v2", "gptj"):
            layout = "interleaved"
        else:
            layout = "split_half"
    return RopeConfig(
        theta=float(theta),
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        layout=layout,
        scaling=scaling,
        max_position_embeddings=max_pos,
    )


@_public
def rope_config_to_hf(config: RopeConfig, *, head_dim: int | None = None) -> dict:
    """The HF ``config.json`` keys for a RopeConfig (read by transformers 4.x and 5).

    Writes ``rope_theta``, ``rope_parameters`` (transformers 5) and ``rope_scaling`` (4.x; None
    when unscaled), ``partial_rotary_factor`` when ``rotary_dim`` is set (``head_dim`` then
    needed), ``max_position_embeddings`` when set, and ``rope_interleave`` (True for
    "interleaved_to_split_half", False for "split_half": DeepSeek-V3-like model types default
    to True). HF has no key for "interleaved" (it follows from the model type: GPT-J,
    DeepSeek-V2) nor for static NTK, which is folded into ``rope_theta``.

    Args:
      config: the rope config.
      head_dim: the head size H, required when ``config.rotary_dim`` is set.

    Returns:
      A dict to merge into a HF config dict.
    """
    theta, s = config.theta, config.scaling
    if isinstance(s, NTKScaling):
        if head_dim is None and config.rotary_dim is None:
            raise ValueError("head_dim is required to fold NTKScaling into rope_theta")
        dim = config.rotary_dim or head_dim
        theta = theta * s.factor ** (dim / (dim - 2))
        s = None
    out = {"rope_theta": theta}
    params = {"rope_type": "default", "rope_theta": theta}
    if s is not None:
        rope_type, keys = _HF_FIELDS[type(s)]
        scaling = {"rope_type": rope_type}
        defaults = {f.name: f.default for f in dataclasses.fields(s)}
        for key in keys:
            value = getattr(s, key)
            # HF requires factor and the original length; other keys only when not the default.
            if value is None or (value == defaults[key] and key in _HF_OPTIONAL):
                continue
            scaling[key] = list(value) if isinstance(value, tuple) else value
        params |= scaling
        out["rope_scaling"] = scaling
    else:
        out["rope_scaling"] = None
    if config.rotary_dim is not None:
        if head_dim is None:
            raise ValueError("head_dim is required to write rotary_dim as partial_rotary_factor")
        _resolved_rotary_dim(config, head_dim)
        factor = config.rotary_dim / head_dim
        while int(head_dim * factor) < config.rotary_dim:  # HF reads int(head_dim * factor)
            factor = math.nextafter(factor, 2.0)
        params["partial_rotary_factor"] = factor
        out["partial_rotary_factor"] = params["partial_rotary_factor"]
    out["rope_parameters"] = params
    if config.max_position_embeddings is not None:
        out["max_position_embeddings"] = config.max_position_embeddings
    if config.layout != "interleaved":  # explicit, as MLA model types default to True
        out["rope_interleave"] = config.layout == "interleaved_to_split_half"
    return out
