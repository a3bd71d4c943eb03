"""CacheConfig: one layer's cache as a storage format and a policy (DESIGN.md, Extension point 6).

A cache config is frozen, hashable and JSON-able (``to_dict`` / ``from_dict``), so it can sit in
a layer config, a ``models.LayerSpec`` override or ``models.ModelConfig.cache`` and travel in
checkpoint metadata. The attention kind that builds the cache decides whether it can serve the
config (``check_served``): a config it cannot serve raises ValueError naming the field.

Formats: ``"dense"`` (per-head keys and values: ``KVCache``), ``"latent"`` (MLA latent rows:
``LatentCache``); None is the kind's own format. Quantized formats store the kind's own layout
(dense or latent) as packed integers with per-group scales and zero points and a
full-precision window of recent tokens (``QuantizedKVCache`` / ``QuantizedLatentCache``):

* ``"kivi"`` (KIVI): ``bits`` (2, 3, 4, 8; default 2), keys quantized per channel over groups of
  ``group_size`` tokens, values per token over groups of ``group_size`` channels (default 32),
  the last ``residual`` tokens (default 128; a multiple of ``group_size``) kept in full
  precision, scales and zeros in ``scale_dtype`` (default "float16"). A latent row (key and
  value at once) is quantized per channel like a key. Any policy: a "sink_window" ring needs
  ``sink`` and ``window`` multiples of ``group_size`` (groups of tokens are evicted whole).
* ``"rotatekv"`` (RotateKV's rotation, dense layout only): KIVI's storage of keys and values
  rotated by the normalised Walsh–Hadamard transform of each head (power-of-two head dims);
  queries are rotated alike and outputs rotated back, so without quantization the attention
  is unchanged, and outlier channels are spread before quantization. Not implemented here:
  RotateKV's calibrated channel reordering, pre-RoPE grouped-head rotation and sink tokens.
* ``"mikv"`` (MiKV, dense layout only, policy "full": no token is evicted): every token that
  leaves the ``residual`` window of recent tokens is kept at ``bits`` (default 2), keys and
  values both per token over groups of ``group_size`` channels; the ``important`` (default
  128) tokens with the largest accumulated attention (H2O's heavy hitters) are also kept in
  full precision and attended from there (``MixedPrecisionKVCache``). With ``important`` at
  least the capacity every token is in full precision and the attention is the dense cache's.
  ``saliency="normalized"`` ranks tokens by ZipCache's normalized attention score instead
  (the accumulated attention divided by the number of queries that attended the token, which
  removes causal attention's bias towards early tokens); default ``"accumulated"`` (H2O).
* ``"kvquant"`` (KVQuant, dense layout only, policy "full"; ``KVQuantCache``): KIVI's storage
  (default ``bits`` 4) of keys quantized per channel BEFORE RoPE (the cache stores pre-RoPE
  keys and rotates them at their positions when it attends), values per token; per token
  vector the ``ceil(outliers · dim)`` entries of largest magnitude (``outliers``, a fraction,
  default 0.01; 0: none) are kept in full precision in a side table (dense-and-sparse) and
  zeroed before quantization; the first ``fp_sinks`` tokens (default 1, the attention sink)
  are kept and attended in full precision. ``datatype="nuq"`` (KVQuant's nuqX): the codes
  index a per-layer ``codebook`` = (key levels, value levels), each 2^bits sorted floats in
  [0, 1] fitted on calibration activations (``jaxattn.ops.kv_quant.fit_codebook``; required,
  there is no default; ``models.kv_calibrate.calibrate_kvquant`` fits every layer's through
  the hooks and returns the per-layer configs); default ``"uniform"`` (KIVI's integer grid).
* ``"gear"`` (GEAR, dense layout only, policy "full"; ``GearCache``): keys and values both
  quantized per channel at ``bits`` (default 4) over groups of ``group_size`` tokens, a
  streaming buffer of the last ``residual`` (n_b) tokens in full precision compressed n_b at a
  time; per token vector the ``ceil(outliers · dim)`` largest magnitudes kept exactly (default
  0.02); per compressed block and head the rank-``rank`` (default 4) truncated SVD of the
  remaining quantization residual.

CSKV (``"cskv"``, policy "full"; ``CSKVCache``, PAPERS.md §2): the bi-branch cache of a layer
whose K / V projections are factored ``x A B`` (``jaxattn.convert.cskv``): the features ``x A``
of every token, in the storage dtype or (``bits`` 2 / 4 / 8) per-token RTN codes with an fp32
scale, and the exact keys and values of the last ``residual`` tokens (default 128; 0: none).

Policies:

* ``"full"``: keep every token; a sequence holds at most ``capacity`` positions (the
  ``init_cache`` argument), and writing past it is an error (see ``jaxattn.cache``).
* ``"sink_window"``: keep the first ``sink`` tokens and the last ``window`` (StreamingLLM /
  LM-Infinite): a ring buffer of ``sink + window`` slots whatever ``capacity`` is. Constant
  memory; decoding never overflows, and equals full attention under the mask
  ``jaxattn.masks.SinkWindow(sinks=sink, window=window)``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp

__all__ = ["CacheConfig", "FORMATS", "LAYOUT_FORMATS", "POLICIES", "QUANTIZED_FORMATS"]

QUANTIZED_FORMATS = ("kivi", "rotatekv", "mikv", "kvquant", "gear")
FORMATS = ("dense", "latent", *QUANTIZED_FORMATS)
# CSKV's bi-branch cache (CSKVCache): low-rank features of every token + an exact recent window
FORMATS = (*FORMATS, "cskv")
POLICIES = ("full", "sink_window")
# the formats each cache layout can be stored in (a kind serves its layout's formats); the
# Hadamard rotation of "rotatekv" acts on per-head rows, which MLA's latent row is not
LAYOUT_FORMATS = {"dense": ("dense", *QUANTIZED_FORMATS), "latent": ("latent", "kivi")}
# formats whose key rows are quantized per token (no key groups along the tokens)
_PER_TOKEN_KEYS = ("mikv",)
_KIVI = dict(bits=2, group_size=32, residual=128, scale_dtype="float16")
_QUANT_DEFAULTS = {
    "kivi": _KIVI,
    "rotatekv": _KIVI,
    "mikv": dict(_KIVI, important=128, saliency="accumulated"),
    "kvquant": dict(_KIVI, bits=4, outliers=0.01, fp_sinks=1, datatype="uniform"),
    "gear": dict(_KIVI, bits=4, outliers=0.02, rank=4),
}
# formats that keep every token (policy "full" only) and fields only they take
_FULL_ONLY = ("mikv", "kvquant", "gear")
_OWN_FIELDS = {
    "important": "mikv", "saliency": "mikv",
    "outliers": ("kvquant", "gear"),
    "rank": "gear",
    "fp_sinks": "kvquant",
    "datatype": "kvquant",
    "codebook": "kvquant",
}  # fmt: skip
DATATYPES = ("uniform", "nuq")
SALIENCY = ("accumulated", "normalized")
_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """A layer's cache: storage format, policy and storage dtype.

    Attributes:
      format: one of ``FORMATS``, or None for the kind's own.
      policy: one of ``POLICIES``.
      sink: "sink_window": tokens kept from the start of each sequence (>= 0).
      window: "sink_window": most recent tokens kept (>= 1); unset for "full".
      dtype: storage dtype name (e.g. "bfloat16"), or None: the ``init_cache`` dtype (a
        quantized format keeps its full-precision window in it).
      bits: quantized formats: code width, one of (2, 3, 4, 8).
      group_size: quantized formats: numbers per scale / zero point.
      residual: quantized formats: recent tokens kept in full precision (a multiple of
        ``group_size``).
      scale_dtype: quantized formats: storage dtype of scales and zero points.
      important: "mikv": tokens also kept in full precision (the heavy hitters, >= 0).
      saliency: "mikv": the importance ranking, one of ``SALIENCY``.
      outliers: "kvquant", "gear": fraction of each token vector's entries kept in full precision
        (the largest magnitudes; a float in [0, 0.5]).
      rank: "gear": rank of each flushed block's low-rank residual (>= 0; 0: none).
      fp_sinks: "kvquant": first tokens of each sequence kept in full precision (>= 0).
      datatype: "kvquant": one of ``DATATYPES`` ("nuq": non-uniform codes, needs ``codebook``).
      codebook: "kvquant" "nuq": (key levels, value levels), each 2^bits sorted floats in
        [0, 1] (normalised per quantization group); stored as tuples.
    """

    format: str | None = None
    policy: str = "full"
    sink: int = 0
    window: int | None = None
    dtype: Any = None
    bits: int | None = None
    group_size: int | None = None
    residual: int | None = None
    scale_dtype: Any = None
    important: int | None = None
    saliency: str | None = None
    outliers: float | None = None
    fp_sinks: int | None = None
    rank: int | None = None
    datatype: str | None = None
    codebook: Any = None

    def __post_init__(self):
        o = "CacheConfig"
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"{o}.format={self.format!r} must be one of {FORMATS} or None")
        if self.policy not in POLICIES:
            raise ValueError(f"{o}.policy={self.policy!r} must be one of {POLICIES}")
        for name in ("sink", "window", "bits", "group_size", "residual", "important", "fp_sinks",
                     "rank"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral)
            ):
                raise ValueError(f"{o}.{name}={value!r} must be an int")
        if self.policy == "full" and (self.sink or self.window is not None):
            raise ValueError(
                f"{o}.policy='full' keeps every token: sink={self.sink} and "
                f"window={self.window} apply to policy='sink_window' only"
            )
        if self.policy == "sink_window":
            if self.window is None or self.window < 1:
                raise ValueError(
                    f"{o}.window={self.window!r} must be an int >= 1 for 'sink_window'"
                )
            if self.sink < 0:
                raise ValueError(f"{o}.sink={self.sink} must be >= 0")
        if self.dtype is not None:
            try:
                dt = jnp.dtype(self.dtype)
            except TypeError:
                raise ValueError(
                    f"{o}.dtype={self.dtype!r} is not a dtype (e.g. 'bfloat16')"
                ) from None
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"{o}.dtype={self.dtype!r} must be a floating dtype")
            object.__setattr__(self, "dtype", dt.name)  # a name: hashable and JSON-able
        object.__setattr__(self, "sink", int(self.sink))
        self._check_quantized()

    @property
    def quantized(self) -> bool:
        """Whether the format stores packed integers (one of ``QUANTIZED_FORMATS``)."""
        return self.format in QUANTIZED_FORMATS

    def _check_quantized(self):
        if self.format == "cskv":
            return self._check_cskv()
        o = "CacheConfig"
        names = ("bits", "group_size", "residual", "scale_dtype")
        for name, fmt in _OWN_FIELDS.items():
            if self.format not in (fmt if isinstance(fmt, tuple) else (fmt,)) and (
                getattr(self, name) is not None
            ):
                fmts = " or ".join(map(repr, fmt if isinstance(fmt, tuple) else (fmt,)))
                raise ValueError(
                    f"{o}.{name}={getattr(self, name)!r} applies to format={fmts} only, not "
                    f"format={self.format!r}"
                )
        if not self.quantized:
            for name in names:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{o}.{name}={getattr(self, name)!r} applies to the quantized formats "
                        f"{QUANTIZED_FORMATS} only, not format={self.format!r}"
                    )
            return
        for name, default in _QUANT_DEFAULTS[self.format].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.bits not in _BITS:
            raise ValueError(f"{o}.bits={self.bits} must be one of {_BITS}")
        for name in ("group_size", "residual"):
            if getattr(self, name) < 1:
                raise ValueError(f"{o}.{name}={getattr(self, name)} must be >= 1")
        g = self.group_size
        if self.format in _PER_TOKEN_KEYS:
            if self.important < 0:
                raise ValueError(f"{o}.important={self.important} must be >= 0")
            if self.saliency not in SALIENCY:
                raise ValueError(f"{o}.saliency={self.saliency!r} must be one of {SALIENCY}")
        elif self.residual % g:
            raise ValueError(
                f"{o}.group_size={g} must divide {o}.residual={self.residual} (keys are "
                "quantized per channel in groups of group_size tokens as the window fills)"
            )
        if self.format in ("kvquant", "gear"):
            f = self.outliers
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 <= f <= 0.5:
                raise ValueError(f"{o}.outliers={f!r} must be a fraction in [0, 0.5]")
            object.__setattr__(self, "outliers", float(f))
        if self.format == "gear" and self.rank < 0:
            raise ValueError(f"{o}.rank={self.rank} must be >= 0")
        if self.format == "kvquant":
            if self.fp_sinks < 0:
                raise ValueError(f"{o}.fp_sinks={self.fp_sinks} must be >= 0")
            self._check_codebook()
        if self.format in _FULL_ONLY and self.policy != "full":
            raise ValueError(
                f"{o}.format={self.format!r} keeps every token (quantized tokens are never "
                f"evicted): policy={self.policy!r} must be 'full'"
            )
        if self.policy == "sink_window" and (self.sink % g or self.window % g):
            raise ValueError(
                f"{o}.group_size={g} must divide {o}.sink={self.sink} and {o}.window="
                f"{self.window} (a ring evicts whole groups of quantized tokens)"
            )
        try:
            dt = jnp.dtype(self.scale_dtype)
        except TypeError:
            raise ValueError(f"{o}.scale_dtype={self.scale_dtype!r} is not a dtype") from None
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"{o}.scale_dtype={self.scale_dtype!r} must be a floating dtype")
        object.__setattr__(self, "scale_dtype", dt.name)

    def _check_cskv(self):
        """format "cskv": ``residual`` exact recent tokens (default 128, >= 0), ``bits`` None
        (features in the storage dtype) or 2 / 4 / 8 (per-token RTN codes); policy "full"."""
        o = "CacheConfig"
        for name in ("group_size", "scale_dtype", *_OWN_FIELDS):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{o}.{name}={getattr(self, name)!r} does not apply to format='cskv' "
                    "(it takes bits and residual)"
                )
        if self.policy != "full":
            raise ValueError(
                f"{o}.format='cskv' keeps every token's features: policy={self.policy!r} must "
                "be 'full'"
            )
        if self.residual is None:
            object.__setattr__(self, "residual", 128)
        if self.residual < 0:
            raise ValueError(f"{o}.residual={self.residual} must be >= 0 for format='cskv'")
        if self.bits is not None and self.bits not in (2, 4, 8):
            raise ValueError(f"{o}.bits={self.bits} must be None, 2, 4 or 8 for format='cskv'")

    def _check_codebook(self):
        o = "CacheConfig"
        if self.datatype not in DATATYPES:
            raise ValueError(f"{o}.datatype={self.datatype!r} must be one of {DATATYPES}")
        if self.datatype == "uniform":
            if self.codebook is not None:
                raise ValueError(f"{o}.codebook applies to datatype='nuq' only")
            return
        if self.codebook is None:
            raise ValueError(
                f"{o}.codebook is required for datatype='nuq': (key levels, value levels) fitted "
                "on calibration activations (jaxattn.ops.kv_quant.fit_codebook)"
            )
        n = 1 << self.bits
        try:
            books = tuple(tuple(float(x) for x in book) for book in self.codebook)
        except TypeError:
            raise ValueError(f"{o}.codebook must be (key levels, value levels)") from None
        if len(books) != 2 or any(len(book) != n for book in books):
            raise ValueError(
                f"{o}.codebook must be (key levels, value levels) of 2^bits={n} floats each"
            )
        for book in books:
            if any(not 0 <= x <= 1 for x in book) or list(book) != sorted(book):
                raise ValueError(f"{o}.codebook levels must be sorted floats in [0, 1]")
        object.__setattr__(self, "codebook", books)  # tuples: hashable, from JSON lists too

    @property
    def slots(self) -> int | None:
        """Slots per sequence of a "sink_window" ring buffer (None: "full", the capacity)."""
        return None if self.policy == "full" else self.sink + self.window

    def storage_dtype(self, default):
        """``dtype``, or ``default`` when it is unset."""
        return default if self.dtype is None else jnp.dtype(self.dtype)

    def check_served(self, owner: str, *, formats: tuple[str, ...], policies: tuple[str, ...]):
        """Raise ValueError when ``owner`` (a kind config) cannot serve this cache.

        Args:
          owner: the kind's config name, for the message.
          formats: the formats it stores; policies: the policies it serves.
        """
        if self.format is not None and self.format not in formats:
            raise ValueError(
                f"{owner} cannot serve cache.format={self.format!r}: it stores {formats}"
            )
        if self.policy not in policies:
            raise ValueError(
                f"{owner} cannot serve cache.policy={self.policy!r}: it serves {policies}"
            )

    def to_dict(self) -> dict:
        """A JSON-able dict (``from_dict`` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CacheConfig:
        """The config of ``to_dict``'s output.

        Raises:
          ValueError: unknown keys (named) or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"CacheConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"CacheConfig has no fields {unknown}; fields: {sorted(known)}")
        return cls(**data)
