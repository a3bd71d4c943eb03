"""ZipCache's channel-separable tokenwise quantization (He et al. 2024; PAPERS.md §5).

Groupwise quantization (KIVI's values: one scale and zero per token per group of g channels)
keeps outlier channels from stretching a token's range at the cost of 2·T·D/g parameters.
ZipCache instead normalises each channel once by

  c_i = sqrt(max_t |X[t, i]|)                 (one scale per channel, D parameters)

and quantizes X / c per token over all channels (KIVI's equations, ``jaxattn.ops.kv_quant``,
2·T parameters); dequantization multiplies by c again. The square root halves an outlier
channel's magnitude on a log scale, so the per-token ranges shrink towards the normal
channels' without one group per few channels: D + 2·T parameters instead of 2·T·D/g.

This is the quantizer only (a plain-jnp reference); it is not yet a ``jaxattn.cache`` format.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.ops.kv_quant import dequantize, quantize

__all__ = ["channel_separable_quantize", "channel_separable_dequantize", "num_quant_params"]


def channel_separable_quantize(x_TD: jax.Array, bits: int, *, scale_dtype=jnp.float16):
    """ZipCache's quantization of one matrix (tokens × channels).

    Args:
      x_TD: [T, D] float.
      bits: code width (one of ``jaxattn.ops.kv_quant.BITS``).
      scale_dtype: storage dtype of every scale and zero.

    Returns:
      (codes [T, D] unpacked, token scale [T, 1], token zero [T, 1], channel scale [1, D]).

    Raises:
      ValueError: ``x_TD`` is not 2-D, or an unsupported ``bits``.
    """
    if x_TD.ndim != 2:
        raise ValueError(f"x_TD must be [T, D], got shape {x_TD.shape}")
    x = x_TD.astype(jnp.float32)
    c = jnp.sqrt(jnp.max(jnp.abs(x), axis=0, keepdims=True))
    c = jnp.where(c > 0, c, 1.0).astype(scale_dtype)  # an all-zero channel: scale 1
    codes, scale, zero = quantize(x / c.astype(jnp.float32), bits, -1, scale_dtype=scale_dtype)
    return codes, scale, zero, c


def channel_separable_dequantize(codes, scale, zero, channel_scale, dtype=jnp.float32):
    """The inverse of ``channel_separable_quantize``: (codes · s + z) · c, in ``dtype``."""
    x = dequantize(codes, scale, zero) * channel_scale.astype(jnp.float32)
    return x.astype(dtype)


def num_quant_params(tokens: int, channels: int, *, group_size: int | None = None) -> int:
    """Scales and zeros of one [T, D] matrix: ZipCache's D + 2·T (``group_size`` None), or
    groupwise quantization's 2·T·D/g (one scale and zero per token per ``group_size`` channels).

    Raises:
      ValueError: a ``group_size`` that does not divide ``channels``.
    """
    if group_size is None:
        return channels + 2 * tokens
    if group_size < 1 or channels % group_size:
        raise ValueError(f"group_size={group_size} must divide channels={channels}")
    return 2 * tokens * channels // group_size
