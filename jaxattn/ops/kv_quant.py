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


def quantize(x: jax.Array, bits: int, axes, *, scale_dtype=jnp.float16):
    """KIVI's equations (1)-(2) over the groups that ``axes`` reduce.

    Args:
      x: float array; every slice along ``axes`` is one group.
      bits: b, one of ``BITS``.
      axes: the axes a group spans (int or tuple).
      scale_dtype: the storage dtype of scales and zeros.

    Returns:
      (codes uint8 or uint32 like x (unpacked, in [0, 2^b)), scale, zero), scale and zero with
      ``axes`` kept as size 1, in ``scale_dtype``.
    """
    word_dtype(bits)
    x32 = x.astype(jnp.float32)
    lo = jnp.min(x32, axis=axes, keepdims=True)
    hi = jnp.max(x32, axis=axes, keepdims=True)
    levels = (1 << bits) - 1
    zero = _round_down(lo, scale_dtype)
    z32 = zero.astype(jnp.float32)
    scale = _round_up((hi - z32) / levels, scale_dtype)
    s32 = scale.astype(jnp.float32)
    inv = jnp.where(s32 > 0, 1.0 / jnp.where(s32 > 0, s32, 1.0), 0.0)  # a constant group: code 0
    codes = jnp.clip(jnp.round((x32 - z32) * inv), 0, levels)
    return codes.astype(word_dtype(bits)), scale, zero


def dequantize(codes, scale, zero, dtype=jnp.float32) -> jax.Array:
    """KIVI's equation (3): codes · scale + zero (broadcast) in fp32, cast to ``dtype``."""
    return (
        codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)
    ).astype(dtype)


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
