"""GEAR's three-part approximation of a KV matrix (PAPERS.md §5), as a plain-jnp reference.

GEAR (Kang et al.) writes a cache matrix X [T, D] (one head's keys or values) as

  X ≈ D̂ + L + S

* S: the sparse outliers, the ``outliers`` entries of largest magnitude, kept exactly;
* D̂: the b-bit quantization of the other entries (KIVI's equations, ``jaxattn.ops.kv_quant``),
  per token over groups of ``group_size`` channels: without its outliers a group's range is
  small;
* L: the best rank-r approximation (truncated SVD) of the remaining residual X − S − D̂.

So a rank-0, outlier-free GEAR is plain quantization; L, the residual's best rank-r fit, only
lowers the Frobenius error of D̂ + S; full rank reproduces X. This is the reference for a GEAR
cache format; the streaming cache (a low-rank fit per flushed group, the decode-time low-rank
add and sparse scatter) is not built yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.ops.kv_quant import dequantize, quantize

__all__ = ["gear_approximation"]


def gear_approximation(
    x_TD: jax.Array, *, bits: int, rank: int, outliers: int, group_size: int | None = None
):
    """GEAR's D̂ + L + S of one matrix.

    Args:
      x_TD: [T, D] float.
      bits: code width of the quantized part.
      rank: r, the rank of L (0: none; min(T, D): exact).
      outliers: entries kept exactly in S (0: none).
      group_size: channels per quantization group (default D: one group per token).

    Returns:
      dict with ``approx`` (D̂ + L + S, [T, D] fp32), ``quantized`` (D̂), ``low_rank`` (L),
      ``sparse`` (S, dense [T, D] with ``outliers`` non-zeros at most).

    Raises:
      ValueError: ``rank`` outside [0, min(T, D)], ``outliers`` outside [0, T·D], or a
        ``group_size`` that does not divide D.
    """
    t, d = x_TD.shape
    g = d if group_size is None else group_size
    if not 0 <= rank <= min(t, d):
        raise ValueError(f"rank={rank} must be in [0, min(T, D)={min(t, d)}]")
    if not 0 <= outliers <= t * d:
        raise ValueError(f"outliers={outliers} must be in [0, T·D={t * d}]")
    if d % g:
        raise ValueError(f"group_size={g} must divide D={d}")
    x = x_TD.astype(jnp.float32)
    flat = x.reshape(-1)
    sparse = jnp.zeros_like(flat)
    if outliers:
        idx = jax.lax.top_k(jnp.abs(flat), outliers)[1]
        sparse = sparse.at[idx].set(flat[idx])
    sparse = sparse.reshape(t, d)
    # an outlier's entry is quantized as its group's smallest other entry, so it no longer
    # stretches the group's range (and never widens it)
    is_out = (sparse != 0).reshape(t, d // g, g)
    grouped = x.reshape(t, d // g, g)
    fill = jnp.min(jnp.where(is_out, jnp.inf, grouped), axis=-1, keepdims=True)
    dense = jnp.where(is_out, jnp.where(jnp.isinf(fill), 0.0, fill), grouped)
    codes, scale, zero = quantize(dense, bits, -1, scale_dtype=jnp.float32)
    quantized = dequantize(codes, scale, zero).reshape(t, d)
    quantized = jnp.where(sparse != 0, 0.0, quantized)  # S holds those entries exactly
    low_rank = jnp.zeros_like(x)
    if rank:
        u, s, vt = jnp.linalg.svd(x - sparse - quantized, full_matrices=False)
        low_rank = (u[:, :rank] * s[:rank]) @ vt[:rank]
    approx = quantized + low_rank + sparse
    return {"approx": approx, "quantized": quantized, "low_rank": low_rank, "sparse": sparse}
