"""RoPE configuration: ``RopeConfig``, the scaling dataclasses, their validation, and the
float32 frequency math of each scaling (HF's operation order, so results agree to an ulp).

Private: import these names from ``jaxattn.ops.rope``, which re-exports them. The public
classes keep ``__module__ = "jaxattn.ops.rope"``, so checkpointed configs name that module.
Shape suffixes: P2 = rotary_dim // 2 (one per rotated pair).
"""

from __future__ import annotations

import dataclasses
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("split_half", "interleaved", "interleaved_to_split_half")


def _public(obj):
    """Present ``obj`` as defined in ``jaxattn.ops.rope`` (checkpoint JSON records the module)."""
    obj.__module__ = "jaxattn.ops.rope"
    return obj


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
        cls = type(self).__name__
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_factor") and isinstance(value, (tuple, list)):
                value = tuple(float(v) for v in value)  # longrope's per-pair factors
                if not value or min(value) <= 0:
                    raise ValueError(
                        f"{cls}.{field.name} must be a non-empty list of positive numbers"
                    )
                object.__setattr__(self, field.name, value)
            elif field.name.startswith("mscale") and value == 0:
                continue  # HF treats a zero mscale as unset
            elif field.type != "bool" and not (value is None and field.default is None):
                integer = field.name.endswith("max_position_embeddings")
                _check_positive(f"{cls}.{field.name}", value, integer=integer)


@_public
@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearScaling(_Scaling):
    """Position interpolation (Chen et al. 2023; HF "linear"): ``inv_freq / factor``."""

    factor: float


@_public
@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicNTKScaling(_Scaling):
    """Dynamic NTK (HF "dynamic"). With s = max(largest position + 1, M), M =
    ``RopeConfig.max_position_embeddings`` (required): when s > M, theta becomes
    ``theta * (factor * s / M - (factor - 1)) ** (P / (P - 2))``; otherwise unscaled.
    Stateless: s comes from this call's positions, whereas HF's module keeps the largest s seen
    until a call falls back under M; they agree whenever positions only grow (generation)."""

    factor: float


@_public
@dataclasses.dataclass(frozen=True, kw_only=True)
class NTKScaling(_Scaling):
    """Static NTK-aware scaling (bloc97): ``theta * factor ** (P / (P - 2))`` at every length."""

    factor: float


@_public
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
            raise ValueError(
                f"Llama3Scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                f"Llama3Scaling.low_freq_factor ({self.low_freq_factor})"
            )


@_public
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


@_public
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


@_public
@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """How to rotate queries and keys; frozen and hashable (usable as a static jit argument).

    Attributes:
      theta: base wavelength (HF ``rope_theta``).
      rotary_dim: number of leading head dims rotated (even); None rotates the whole head.
      layout: one of ``LAYOUTS`` (see ``jaxattn.ops.rope``'s module docstring).
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
        _check_positive("RopeConfig.theta", self.theta)
        if self.rotary_dim is not None:
            _check_positive("RopeConfig.rotary_dim", self.rotary_dim, integer=True)
            if self.rotary_dim % 2:
                raise ValueError(f"RopeConfig.rotary_dim must be even, got {self.rotary_dim}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"RopeConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.scaling is not None and not isinstance(self.scaling, _SCALINGS):
            names = [c.__name__ for c in _SCALINGS]
            raise ValueError(
                f"RopeConfig.scaling must be None or one of {names}, got {self.scaling!r}"
            )
        if self.max_position_embeddings is not None:
            _check_positive(
                "RopeConfig.max_position_embeddings", self.max_position_embeddings, integer=True
            )
        s, missing = self.scaling, False
        if isinstance(s, DynamicNTKScaling):
            missing = True
        elif isinstance(s, (YarnScaling, LongRopeScaling)):
            missing = s.original_max_position_embeddings is None or s.factor is None
        if missing and self.max_position_embeddings is None:
            raise ValueError(
                f"RopeConfig.max_position_embeddings is required by {type(s).__name__} here"
            )


def _resolved_rotary_dim(config: RopeConfig, head_dim: int) -> int:
    _check_positive("head_dim", head_dim, integer=True)
    dim = head_dim if config.rotary_dim is None else config.rotary_dim
    if dim > head_dim:
        raise ValueError(f"rotary_dim={dim} must be <= head_dim={head_dim}")
    if dim % 2:
        raise ValueError(f"rotary_dim (= head_dim when unset) must be even, got {dim}")
    return int(dim)


def _original_and_factor(config: RopeConfig, s: YarnScaling | LongRopeScaling):
    """yarn / longrope's original length and factor, defaulted from the config when unset."""
    orig = s.original_max_position_embeddings or config.max_position_embeddings
    factor = s.factor if s.factor is not None else config.max_position_embeddings / orig
    return orig, factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
    orig, factor = _original_and_factor(config, s)
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


def _longrope_inv_freq(config, s: LongRopeScaling, theta, exps_P2, dim: int, seq_len):
    """Short or long factors by ``seq_len`` (may be traced; None means short)."""
    orig, factor = _original_and_factor(config, s)
    attention = s.attention_factor
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    for name in ("short_factor", "long_factor"):
        if len(getattr(s, name)) != dim // 2:
            raise ValueError(
                f"LongRopeScaling.{name} must have rotary_dim // 2 = {dim // 2} entries"
            )
    powers_P2 = _pow32(theta, exps_P2)
    short_P2 = _rdiv(1, np.asarray(s.short_factor, _F32) * powers_P2)
    long_P2 = _rdiv(1, np.asarray(s.long_factor, _F32) * powers_P2)
    use_long = False if seq_len is None else jnp.asarray(seq_len) > orig
    return jnp.where(use_long, long_P2, short_P2), float(attention)
