"""Asymmetric integer quantization of KV-cache rows and its bit packing (KIVI, PAPERS.md §5).

KIVI's equations, for one quantization group X (the numbers that share a scale and a zero):

  (1) z_X = min X,   s_X = (max X − min X) / (2^b − 1)
  (2) Q(X) = clamp(round((X − z_X) / s_X), 0, 2^b − 1)       (b-bit unsigned codes)
  (3) X'  = Q(X) · s_X + z_X                                 (dequantization)

so |X − X'| <= s_X / 2 element-wise. Which numbers form a group is the caller's choice, given as
the reduction axes: KIVI quantizes keys per channel (a group is one channel over ``group_size``
consecutive tokens) and values per token (one token over ``group_size`` consecutive channels).

Scales and zeros are stored in a low-precision float (fp16 in KIVI). Rounding them naively can
push a group's extremes outside the code range; here z is rounded down and s up to the storage
dtype, so (2) never clips and the bound s/2 holds with the stored s.

Codes are packed along the last axis into unsigned words: ``32 // b`` codes per uint32 word for
3 bits (10 codes, 2 bits unused), ``8 // b`` per uint8 byte for 2, 4 and 8 bits. The last axis
is padded with zero codes to a whole number of words.

Non-uniform datatypes (KVQuant's nuqX): ``levels`` replaces the integer grid 0 .. 2^b − 1 of (2)
and (3) by 2^b sorted levels in the same units (a codebook c in [0, 1] times 2^b − 1): a number
takes the code of the nearest level of (X − z_X) / s_X and dequantizes to levels[code] · s_X +
z_X. ``fit_codebook`` fits the codebook on calibration data normalised per group
(``normalize``) by weighted 1-D k-means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "BITS",
    "word_dtype",
    "codes_per_word",
    "packed_width",
    "pack_codes",
    "unpack_codes",
    "quantize",
    "dequantize",
    "hadamard",
    "normalize",
    "fit_codebook",
]

BITS = (2, 3, 4, 8)


def word_dtype(bits: int):
    """The packing word: uint8 when ``bits`` divides 8, else uint32 (3 bits)."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} must be one of {BITS}")
    return jnp.dtype(jnp.uint8) if 8 % bits == 0 else jnp.dtype(jnp.uint32)


def codes_per_word(bits: int) -> int:
    """Codes one word holds: 8 // bits (uint8) or 32 // bits (uint32)."""
    return word_dtype(bits).itemsize * 8 // bits


def packed_width(n: int, bits: int) -> int:
    """Words that hold ``n`` codes of ``bits`` bits."""
    return -(-n // codes_per_word(bits))


def pack_codes(codes_X: jax.Array, bits: int) -> jax.Array:
    """Pack integer codes in [0, 2^bits) along the last axis: [..., n] -> [..., W] words."""
    per, dt = codes_per_word(bits), word_dtype(bits)
    n = codes_X.shape[-1]
    w = packed_width(n, bits)
    c = jnp.pad(codes_X.astype(dt), [(0, 0)] * (codes_X.ndim - 1) + [(0, w * per - n)])
    c = c.reshape(*codes_X.shape[:-1], w, per)
    shifts = (jnp.arange(per, dtype=dt) * bits).astype(dt)
    # the fields do not overlap, so their sum is their bitwise or
    return jnp.sum(c << shifts, axis=-1, dtype=dt)


def unpack_codes(words_W: jax.Array, bits: int, n: int) -> jax.Array:
    """The first ``n`` codes of packed words [..., W] -> uint [..., n] (the word's dtype)."""
    per, dt = codes_per_word(bits), words_W.dtype
    shifts = (jnp.arange(per, dtype=dt) * bits).astype(dt)
    mask = jnp.asarray((1 << bits) - 1, dt)
    c = (words_W[..., None] >> shifts) & mask
    return c.reshape(*words_W.shape[:-1], -1)[..., :n]


def _round_down(x32, dtype):
    y = x32.astype(dtype)
    return jnp.where(y.astype(jnp.float32) > x32, jnp.nextafter(y, jnp.asarray(-jnp.inf, dtype)), y)


def _round_up(x32, dtype):
    y = x32.astype(dtype)
    return jnp.where(y.astype(jnp.float32) < x32, jnp.nextafter(y, jnp.asarray(jnp.inf, dtype)), y)


def quantize(x: jax.Array, bits: int, axes, *, scale_dtype=jnp.float16, levels=None):
    """KIVI's equations (1)-(2) over the groups that ``axes`` reduce.

    Args:
      x: float array; every slice along ``axes`` is one group.
      bits: b, one of ``BITS``.
      axes: the axes a group spans (int or tuple).
      scale_dtype: the storage dtype of scales and zeros.
      levels: None (the integer grid), or float32 [2^b] sorted levels in [0, 2^b − 1]: the
        code of each number is its nearest level (a non-uniform datatype).

    Returns:
      (codes uint8 or uint32 like x (unpacked, in [0, 2^b)), scale, zero), scale and zero with
      ``axes`` kept as size 1, in ``scale_dtype``.
    """
    word_dtype(bits)
    nuq = levels
    if nuq is not None and nuq.shape != (1 << bits,):
        raise ValueError(f"levels must have shape [2^bits] = [{1 << bits}], got {nuq.shape}")
    x32 = x.astype(jnp.float32)
    lo = jnp.min(x32, axis=axes, keepdims=True)
    hi = jnp.max(x32, axis=axes, keepdims=True)
    levels = (1 << bits) - 1
    zero = _round_down(lo, scale_dtype)
    z32 = zero.astype(jnp.float32)
    scale = _round_up((hi - z32) / levels, scale_dtype)
    s32 = scale.astype(jnp.float32)
    inv = jnp.where(s32 > 0, 1.0 / jnp.where(s32 > 0, s32, 1.0), 0.0)  # a constant group: code 0
    if nuq is not None:  # the nearest of the 2^b levels
        u = (x32 - z32) * inv
        codes = jnp.argmin(jnp.abs(u[..., None] - nuq.astype(jnp.float32)), axis=-1)
        return codes.astype(word_dtype(bits)), scale, zero
    codes = jnp.clip(jnp.round((x32 - z32) * inv), 0, levels)
    return codes.astype(word_dtype(bits)), scale, zero


def dequantize(codes, scale, zero, dtype=jnp.float32, levels=None) -> jax.Array:
    """KIVI's equation (3): codes · scale + zero (broadcast) in fp32, cast to ``dtype``;
    with ``levels`` (float32 [2^b]), levels[codes] · scale + zero."""
    c = codes.astype(jnp.float32) if levels is None else levels.astype(jnp.float32)[codes]
    return (c * scale.astype(jnp.float32) + zero.astype(jnp.float32)).astype(dtype)


def normalize(x: jax.Array, axes) -> jax.Array:
    """Each group of x (the slices along ``axes``) mapped to [0, 1] by its min and max, in
    fp32: the values a codebook of ``quantize(levels=)`` is fitted on (a constant group: 0)."""
    x32 = x.astype(jnp.float32)
    lo = jnp.min(x32, axis=axes, keepdims=True)
    span = jnp.max(x32, axis=axes, keepdims=True) - lo
    return jnp.where(span > 0, (x32 - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def fit_codebook(u, bits: int, weights=None, *, iters: int = 50) -> jax.Array:
    """KVQuant's non-uniform datatype: 2^b levels fitted by weighted 1-D k-means (Lloyd).

    KVQuant fits its nuqX codebooks by k-means weighted by each activation's sensitivity
    (the diagonal Fisher information, squared gradients of the loss); pass them as
    ``weights``. Without weights every value counts the same (plain k-means).

    Args:
      u: calibration values normalised per group (``normalize``), any shape, in [0, 1].
      bits: b, one of ``BITS``.
      weights: None (uniform), or non-negative weights of u's shape (e.g. Fisher information).
      iters: Lloyd iterations (assign to the nearest level, move each level to the weighted
        mean of its values; a level with no weight stays).

    Returns:
      float32 [2^b] sorted levels in [0, 1].

    Raises:
      ValueError: bad bits, weights of another shape, or negative weights.
    """
    word_dtype(bits)
    u = jnp.ravel(jnp.asarray(u, jnp.float32))
    if weights is None:
        w = jnp.ones_like(u)
    else:
        w = jnp.asarray(weights, jnp.float32)
        if w.size != u.size:
            raise ValueError(f"weights have {w.size} entries but u has {u.size}")
        w = jnp.ravel(w)
        if bool(jnp.any(w < 0)):
            raise ValueError("weights must be non-negative")
    n_levels = 1 << bits
    # start from the uniform grid over the data's range: Lloyd's steps never increase the
    # weighted squared error, so the fit is at least as good as uniform codes on u (quantile
    # starts put several levels on an atom such as each group's min and max, and wasted them)
    cb = jnp.linspace(jnp.min(u), jnp.max(u), n_levels)

    def step(cb, _):
        assign = jnp.argmin(jnp.abs(u[:, None] - cb[None, :]), axis=1)
        num = jnp.zeros(n_levels).at[assign].add(w * u)
        den = jnp.zeros(n_levels).at[assign].add(w)
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), cb), None

    cb, _ = jax.lax.scan(step, cb, None, length=iters)
    return jnp.sort(cb)


def hadamard(x: jax.Array) -> jax.Array:
    """The normalised Walsh–Hadamard transform of the last axis (a power of two, n), by the
    fast butterfly (FWHT, O(n log n)): x·H_n / sqrt(n) with Sylvester's H_n. The matrix is
    symmetric and orthogonal, so ``hadamard`` is its own inverse and (x·H)(y·H)ᵀ = x·yᵀ
    (RotateKV: rotated queries and keys give the unrotated scores). Computed in fp32, returned
    in x's dtype.

    Raises:
      ValueError: the last axis is not a power of two.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two last axis, got {n}")
    lead = x.shape[:-1]
    y = x.astype(jnp.float32)
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return (y.reshape(x.shape) / jnp.sqrt(jnp.float32(n))).astype(x.dtype)
