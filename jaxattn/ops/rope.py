"""Rotary position embeddings (RoPE, Su et al. 2021), numerically matching Hugging Face.

A pair of dims (a, b) of a query or key at integer position m is rotated by the angle
``m * inv_freq[i]``: ``(a, b) -> (a cos - b sin, b cos + a sin)``, with
``inv_freq[i] = theta ** (-2i / P)`` for ``i < P / 2`` (P = ``rotary_dim``) before scaling.
Dims past ``rotary_dim`` pass through unchanged (partial rotary, GPT-NeoX / Phi style).
The result of ``<rope(q, m), rope(k, n)>`` depends only on ``m - n``.

Layouts, i.e. which dims form pair i (HF code that each one matches):

* ``"split_half"``: (i, i + P/2), output in place (HF Llama ``rotate_half``; DeepSeek-V3
  with ``rope_interleave=False``; GPT-NeoX).
* ``"interleaved"``: (2i, 2i+1), output in place (GPT-J, Meta's original Llama, HF
  DeepSeek-V2's complex ``apply_rotary_emb``).
* ``"interleaved_to_split_half"``: the MLA layout of HF DeepSeek-V3 / Mistral4 with
  ``rope_interleave=True`` (their default): the *input* pairs are (2i, 2i+1), as DeepSeek's
  projection weights are laid out, and the *output* is written de-interleaved: rotated even
  dims first, then rotated odd dims (``apply_rotary_pos_emb_interleave``). q_pe and k_pe go
  through the same permutation, so q.k is that of ``"interleaved"``, but the tensor (and a
  cached k_pe) differs from it by the permutation; use it to reproduce HF activations.

Scaling (HF ``rope_parameters["rope_type"]``): ``LinearScaling`` ("linear"),
``DynamicNTKScaling`` ("dynamic", depends on the largest position seen), ``NTKScaling``
(static NTK-aware theta scaling; HF has no such type, so ``rope_config_to_hf`` folds it into
``rope_theta``), ``Llama3Scaling`` ("llama3"), ``YarnScaling`` ("yarn", DeepSeek's mscale
variant included) and ``LongRopeScaling`` ("longrope"). YaRN/LongRoPE multiply cos and sin
by an attention factor; DeepSeek-V2/V3 additionally scale the softmax, see
``mla_softmax_scale_factor``.

Shape suffixes: P = rotary_dim (DESIGN.md's rope dims), P2 = P // 2 (one per rotated pair).

For MLA, call ``apply_rope`` on q_pe [B, T, N, qk_rope_head_dim] and k_pe [B, T, 1, ...] with
``head_dim = qk_rope_head_dim`` (HF DeepSeek sets ``config.head_dim`` to it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LAYOUTS",
    "RopeConfig",
    "RopeScaling",
    "LinearScaling",
    "DynamicNTKScaling",
    "NTKScaling",
    "Llama3Scaling",
    "YarnScaling",
    "LongRopeScaling",
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rope",
    "mla_softmax_scale_factor",
    "rope_config_from_hf",
    "rope_config_to_hf",
]

LAYOUTS = ("split_half", "interleaved", "interleaved_to_split_half")


def _check_positive(name: str, value, *, integer: bool = False) -> None:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value > 0 and (not integer or float(value).is_integer())
    if not ok:
        kind = "positive integer" if integer else "positive number"
        raise ValueError(f"{name} must be a {kind}, got {value!r}")


class _Scaling:
    """Validation shared by the scaling dataclasses: numeric fields must be positive (integers
    for lengths; mscales may be 0); None is allowed only where it is the default."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_factor") and isinstance(value, (tuple, list)):
                value = tuple(float(v) for v in value)  # longrope's per-pair factors
                if not value or min(value) <= 0:
                    raise ValueError(f"{field.name} must be a non-empty list of positive numbers")
                object.__setattr__(self, field.name, value)
            elif field.name.startswith("mscale") and value == 0:
                continue  # HF treats a zero mscale as unset
            elif field.type != "bool" and not (value is None and field.default is None):
                integer = field.name.endswith("max_position_embeddings")
                _check_positive(field.name, value, integer=integer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearScaling(_Scaling):
    """Position interpolation (Chen et al. 2023; HF "linear"): ``inv_freq / factor``."""

    factor: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicNTKScaling(_Scaling):
    """Dynamic NTK (HF "dynamic"). With s = max(largest position + 1, M), M =
    ``RopeConfig.max_position_embeddings`` (required): when s > M, theta becomes
    ``theta * (factor * s / M - (factor - 1)) ** (P / (P - 2))``; otherwise unscaled.
    Stateless: s comes from this call's positions, whereas HF's module keeps the largest s seen
    until a call falls back under M; they agree whenever positions only grow (generation)."""

    factor: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class NTKScaling(_Scaling):
    """Static NTK-aware scaling (bloc97): ``theta * factor ** (P / (P - 2))`` at every length."""

    factor: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3Scaling(_Scaling):
    """Llama 3.1 (HF "llama3"): wavelengths above ``original_max / low_freq_factor`` are
    divided by ``factor``, below ``original_max / high_freq_factor`` kept, smoothed between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        super().__post_init__()
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor must exceed {self.low_freq_factor=}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnScaling(_Scaling):
    """YaRN (Peng et al. 2023; HF "yarn", DeepSeek-V2/V3 included). ``factor=None`` means
    ``max_position_embeddings / original_max_position_embeddings``; an unset
    ``original_max_position_embeddings`` means ``RopeConfig.max_position_embeddings``. cos/sin are
    multiplied by ``attention_factor``, by default ``mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)`` when both are set (DeepSeek; 1.0 when equal), else
    ``0.1 ln(factor) + 1``, where ``mscale(s, m) = 0.1 m ln(s) + 1`` (1 for s <= 1)."""

    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongRopeScaling(_Scaling):
    """LongRoPE (Phi-3; HF "longrope"): ``inv_freq / ext`` with ``ext = long_factor`` when the
    largest position + 1 exceeds ``original_max_position_embeddings``, else ``short_factor``
    (each of length P / 2). cos/sin are multiplied by ``attention_factor``, by default
    ``sqrt(1 + ln(factor) / ln(original_max))`` with ``factor`` defaulting to
    ``max_position_embeddings / original_max_position_embeddings``."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int | None = None
    factor: float | None = None
    attention_factor: float | None = None


RopeScaling = (
    LinearScaling | DynamicNTKScaling | NTKScaling | Llama3Scaling | YarnScaling | LongRopeScaling
)
_SCALINGS = typing.get_args(RopeScaling)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """How to rotate queries and keys; frozen and hashable (usable as a static jit argument).

    Attributes:
      theta: base wavelength (HF ``rope_theta``).
      rotary_dim: number of leading head dims rotated (even); None rotates the whole head.
      layout: one of ``LAYOUTS`` (see the module docstring).
      scaling: one of the scaling dataclasses above, or None.
      max_position_embeddings: HF ``max_position_embeddings``; needed by dynamic NTK and by
        yarn / longrope when their factor or original length is left unset.
    """

    theta: float = 10000.0
    rotary_dim: int | None = None
    layout: str = "split_half"
    scaling: RopeScaling | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self):
        _check_positive("theta", self.theta)
        if self.rotary_dim is not None:
            _check_positive("rotary_dim", self.rotary_dim, integer=True)
            if self.rotary_dim % 2:
                raise ValueError(f"rotary_dim must be even, got {self.rotary_dim}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.scaling is not None and not isinstance(self.scaling, _SCALINGS):
            names = [c.__name__ for c in _SCALINGS]
            raise ValueError(f"scaling must be None or one of {names}, got {self.scaling!r}")
        if self.max_position_embeddings is not None:
            _check_positive("max_position_embeddings", self.max_position_embeddings, integer=True)
        s, missing = self.scaling, False
        if isinstance(s, DynamicNTKScaling):
            missing = True
        elif isinstance(s, (YarnScaling, LongRopeScaling)):
            missing = s.original_max_position_embeddings is None or s.factor is None
        if missing and self.max_position_embeddings is None:
            raise ValueError(f"max_position_embeddings is required by {type(s).__name__} here")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _resolved_rotary_dim(config: RopeConfig, head_dim: int) -> int:
    _check_positive("head_dim", head_dim, integer=True)
    dim = head_dim if config.rotary_dim is None else config.rotary_dim
    if dim > head_dim:
        raise ValueError(f"rotary_dim={dim} must be <= head_dim={head_dim}")
    if dim % 2:
        raise ValueError(f"rotary_dim (= head_dim when unset) must be even, got {dim}")
    return int(dim)


# The frequencies follow HF's float32 torch code op for op, in numpy float32 (IEEE, like torch
# on CPU; XLA would turn x / c into x * (1 / c)). Two torch details matter at the last bit:
# `c / t` is `t.reciprocal() * c`, and pow is taken in float64 and rounded once (torch's own
# float32 pow is within an ulp of that).
_F32 = np.float32


def _pow32(base, exps_P2: np.ndarray) -> np.ndarray:
    return (np.float64(_F32(base)) ** exps_P2.astype(np.float64)).astype(_F32)


def _rdiv(c, t: np.ndarray) -> np.ndarray:
    return (_F32(1) / t) * _F32(c)


def _yarn_inv_freq(config: RopeConfig, s: YarnScaling, exps_P2: np.ndarray, dim: int):
    orig = s.original_max_position_embeddings or config.max_position_embeddings
    factor = s.factor if s.factor is not None else config.max_position_embeddings / orig
    attention = s.attention_factor
    if attention is None:
        if s.mscale and s.mscale_all_dim:
            attention = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)

    # Dims that turn fewer than beta_slow times over the original context are interpolated,
    # more than beta_fast times extrapolated, and a linear ramp in between.
    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(config.theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_P2 = np.clip((np.arange(dim // 2, dtype=_F32) - _F32(low)) / _F32(high - low), 0, 1)
    extrap_weight_P2 = _F32(1) - ramp_P2
    pos_freqs_P2 = _pow32(config.theta, exps_P2)
    interp_P2, extrap_P2 = _rdiv(1, _F32(factor) * pos_freqs_P2), _rdiv(1, pos_freqs_P2)
    inv_freq_P2 = interp_P2 * (_F32(1) - extrap_weight_P2) + extrap_P2 * extrap_weight_P2
    return inv_freq_P2, float(attention)


def _llama3_inv_freq(s: Llama3Scaling, inv_freq_P2: np.ndarray) -> np.ndarray:
    old, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    wavelen_P2 = _rdiv(2 * math.pi, inv_freq_P2)
    inv_freq_P2 = np.where(wavelen_P2 > _F32(old / low), inv_freq_P2 / _F32(s.factor), inv_freq_P2)
    smooth_P2 = (_rdiv(old, wavelen_P2) - _F32(low)) / _F32(high - low)
    smoothed_P2 = (_F32(1) - smooth_P2) * inv_freq_P2 / _F32(s.factor) + smooth_P2 * inv_freq_P2
    medium_P2 = ~(wavelen_P2 < _F32(old / high)) & ~(wavelen_P2 > _F32(old / low))
    return np.where(medium_P2, smoothed_P2, inv_freq_P2)


def _dynamic_inv_freq(config, s: DynamicNTKScaling, exps_P2, dim: int, seq_len, unscaled_P2):
    """HF recomputes theta in float32 torch ops once seq_len exceeds M; mirror that order."""
    m, power = config.max_position_embeddings, dim / (dim - 2)
    try:
        seq_len = int(seq_len)
    except (TypeError, jax.errors.ConcretizationTypeError):  # traced: the same ops in jnp
        seq_f32 = jnp.maximum(seq_len, m).astype(jnp.float32)
        ratio = jnp.float32(s.factor) * seq_f32 / jnp.float32(m) - jnp.float32(s.factor - 1)
        base = jnp.float32(config.theta) * ratio ** jnp.float32(power)
        scaled_P2 = 1.0 / jnp.power(base, jnp.asarray(exps_P2))
        return jnp.where(seq_len > m, scaled_P2, unscaled_P2)
    if seq_len <= m:
        return unscaled_P2
    ratio = _F32(s.factor) * _F32(seq_len) / _F32(m) - _F32(s.factor - 1)
    base = _F32(config.theta) * _pow32(ratio, np.asarray(power, _F32))
    return _rdiv(1, _pow32(base, exps_P2))


def rope_frequencies(
    config: RopeConfig, head_dim: int, seq_len: int | jax.Array | None = None
) -> tuple[jax.Array, float]:
    """Inverse frequencies and the cos/sin attention factor, as HF's ``ROPE_INIT_FUNCTIONS``.

    Computed in float32 with HF's operation order, so they agree with transformers to an ulp.

    Args:
      config: the rope config.
      head_dim: the size H of the heads rope is applied to (for MLA, ``qk_rope_head_dim``).
      seq_len: largest position + 1 (may be traced); only dynamic NTK and longrope use it.
        None means the unscaled / short setting, as HF at initialisation.

    Returns:
      ``(inv_freq_P2, attention_factor)``: float32 [rotary_dim // 2] and a Python float
      (1.0 unless yarn / longrope).
    """
    dim = _resolved_rotary_dim(config, head_dim)
    s, theta, attention = config.scaling, config.theta, 1.0
    if isinstance(s, (DynamicNTKScaling, NTKScaling)) and dim <= 2:
        raise ValueError(f"rotary_dim must be > 2 for {type(s).__name__}, got {dim}")
    if isinstance(s, NTKScaling):
        theta = theta * s.factor ** (dim / (dim - 2))
    exps_P2 = np.arange(0, dim, 2, dtype=_F32) / _F32(dim)
    inv_freq_P2 = _rdiv(1, _pow32(theta, exps_P2))
    if isinstance(s, LinearScaling):
        inv_freq_P2 = inv_freq_P2 / _F32(s.factor)
    elif isinstance(s, Llama3Scaling):
        inv_freq_P2 = _llama3_inv_freq(s, inv_freq_P2)
    elif isinstance(s, YarnScaling):
        inv_freq_P2, attention = _yarn_inv_freq(config, s, exps_P2, dim)
    elif isinstance(s, DynamicNTKScaling) and seq_len is not None:
        inv_freq_P2 = _dynamic_inv_freq(config, s, exps_P2, dim, seq_len, inv_freq_P2)
    elif isinstance(s, LongRopeScaling):
        orig = s.original_max_position_embeddings or config.max_position_embeddings
        factor = s.factor if s.factor is not None else config.max_position_embeddings / orig
        attention = s.attention_factor
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        for name in ("short_factor", "long_factor"):
            if len(getattr(s, name)) != dim // 2:
                raise ValueError(f"{name} must have rotary_dim // 2 = {dim // 2} entries")
        powers_P2 = _pow32(theta, exps_P2)
        short_P2 = _rdiv(1, np.asarray(s.short_factor, _F32) * powers_P2)
        long_P2 = _rdiv(1, np.asarray(s.long_factor, _F32) * powers_P2)
        use_long = False if seq_len is None else jnp.asarray(seq_len) > orig
        inv_freq_P2 = jnp.where(use_long, long_P2, short_P2)
    return jnp.asarray(inv_freq_P2, jnp.float32), float(attention)


def rope_cos_sin(
    positions_BT: jax.Array, config: RopeConfig, head_dim: int
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, one per rotated pair, times the attention factor.

    Args:
      positions_BT: integer positions [B, T]; dynamic NTK / longrope use max + 1 as seq_len.
      config: the rope config.
      head_dim: the head size H.

    Returns:
      ``(cos_BTP2, sin_BTP2)`` float32 [B, T, rotary_dim // 2] (one angle per pair).
    """
    positions_BT = _checked_positions(positions_BT)
    _resolved_rotary_dim(config, head_dim)
    return _rope_cos_sin_jit(positions_BT, config, head_dim)


def _checked_positions(positions_BT: jax.Array) -> jax.Array:
    positions_BT = jnp.asarray(positions_BT)
    if positions_BT.ndim != 2 or not jnp.issubdtype(positions_BT.dtype, jnp.integer):
        raise ValueError(
            f"positions_BT must be an integer [B, T] array, got {positions_BT.dtype}"
            f"{list(positions_BT.shape)}"
        )
    return positions_BT


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rope_cos_sin_jit(positions_BT: jax.Array, config: RopeConfig, head_dim: int):
    seq_len = None
    if isinstance(config.scaling, (DynamicNTKScaling, LongRopeScaling)):
        seq_len = jnp.max(positions_BT) + 1
    inv_freq_P2, attention = rope_frequencies(config, head_dim, seq_len)
    angles_BTP2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_P2
    return jnp.cos(angles_BTP2) * attention, jnp.sin(angles_BTP2) * attention


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, config: RopeConfig) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of each head of x at integer positions.

    Args:
      x_BTNH: queries or keys [B, T, N, H], any float dtype.
      positions_BT: integer positions [B, T] of x's tokens.
      config: the rope config (layout, scaling, rotary_dim).

    Returns:
      [B, T, N, H], x's dtype; dims past rotary_dim unchanged; the math runs in float32.
    """
    x_BTNH, positions_BT = jnp.asarray(x_BTNH), _checked_positions(positions_BT)
    if x_BTNH.ndim != 4:
        raise ValueError(f"x_BTNH must have rank 4 [B, T, N, H], got shape {x_BTNH.shape}")
    if positions_BT.shape != x_BTNH.shape[:2]:
        raise ValueError(
            f"positions_BT must have shape [B, T] = {x_BTNH.shape[:2]}, got {positions_BT.shape}"
        )
    _resolved_rotary_dim(config, x_BTNH.shape[-1])
    return _apply_rope_jit(x_BTNH, positions_BT, config)


@functools.partial(jax.jit, static_argnums=2)
def _apply_rope_jit(x_BTNH: jax.Array, positions_BT: jax.Array, config: RopeConfig) -> jax.Array:
    # One compiled program per shape and config: eager op-by-op dispatch is much slower.
    head_dim = x_BTNH.shape[-1]
    dim = _resolved_rotary_dim(config, head_dim)
    cos_BTP2, sin_BTP2 = _rope_cos_sin_jit(positions_BT, config, head_dim)
    cos_BT1P2, sin_BT1P2 = cos_BTP2[:, :, None, :], sin_BTP2[:, :, None, :]
    x_BTNH_f32 = x_BTNH.astype(jnp.float32)
    rot_BTNP, pass_BTNH = x_BTNH_f32[..., :dim], x_BTNH_f32[..., dim:]
    if config.layout == "split_half":
        a_BTNP2, b_BTNP2 = rot_BTNP[..., : dim // 2], rot_BTNP[..., dim // 2 :]
    else:
        a_BTNP2, b_BTNP2 = rot_BTNP[..., 0::2], rot_BTNP[..., 1::2]
    ra_BTNP2 = a_BTNP2 * cos_BT1P2 - b_BTNP2 * sin_BT1P2
    rb_BTNP2 = b_BTNP2 * cos_BT1P2 + a_BTNP2 * sin_BT1P2
    if config.layout == "interleaved":
        rot_BTNP = jnp.stack([ra_BTNP2, rb_BTNP2], axis=-1).reshape(rot_BTNP.shape)
    else:  # split_half, and interleaved_to_split_half writes its output de-interleaved
        rot_BTNP = jnp.concatenate([ra_BTNP2, rb_BTNP2], axis=-1)
    return jnp.concatenate([rot_BTNP, pass_BTNH], axis=-1).astype(x_BTNH.dtype)


def mla_softmax_scale_factor(config: RopeConfig) -> float:
    """Factor HF DeepSeek-V2/V3 multiply the softmax scale by (``yarn_apply_mscale``).

    With yarn and a truthy ``mscale_all_dim``, the scale ``qk_head_dim ** -0.5`` is multiplied
    by ``mscale(factor, mscale_all_dim) ** 2``; otherwise 1.0. This is separate from the cos/sin
    attention factor that ``apply_rope`` already applies.
    """
    s = config.scaling
    if not isinstance(s, YarnScaling) or not s.mscale_all_dim:
        return 1.0
    factor = s.factor
    if factor is None:
        orig = s.original_max_position_embeddings or config.max_position_embeddings
        factor = config.max_position_embeddings / orig
    return _yarn_mscale(factor, s.mscale_all_dim) ** 2


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
