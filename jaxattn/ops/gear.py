"""GEAR's three-part approximation of a KV matrix (PAPERS.md §5), as a plain-jnp reference.

GEAR (Kang et al.) writes a cache matrix X [T, D] (one head's keys or values) as

  X ≈ D̂ + L + S

* S: the sparse outliers, the ``outliers`` entries of largest magnitude, kept exactly;
* D̂: the b-bit quantization of the other entries (KIVI's equations, ``jaxattn.ops.kv_quant``),
  per token over groups of ``group_size`` channels: without its outliers a group's range is
  small;
* L: the best rank-r approximation (truncated SVD) of the remaining residual X − S − D̂.

So a rank-0, outlier-free GEAR is plain quantization; L, the residual's best rank-r fit, only
lowers the Frobenius error of D̂ + S; full rank reproduces X. This is the reference of the
"gear" cache format (``jaxattn.cache.GearCache``), which stores one such approximation per
compressed block of n_b tokens and head, with ``axis="channel"`` (KIVI's key grouping),
``outliers_per="vector"`` (S per token vector) and ``fill="zero"`` (the paper's D̂ = Quant(X − S)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.ops.kv_quant import dequantize, quantize

__all__ = ["gear_approximation"]


def gear_approximation(
    x_TD: jax.Array,
    *,
    bits: int,
    rank: int,
    outliers: int,
    group_size: int | None = None,
    axis: str = "token",
    outliers_per: str = "matrix",
    fill: str = "min",
):
    """GEAR's D̂ + L + S of one matrix.

    Args:
      x_TD: [T, D] float.
      bits: code width of the quantized part.
      rank: r, the rank of L (0: none; min(T, D): exact).
      outliers: entries kept exactly in S (0: none).
      group_size: numbers per quantization group (default: the whole token / channel).
      axis: "token": a group is one token over ``group_size`` channels; "channel": one channel
        over ``group_size`` tokens (KIVI's keys).
      outliers_per: "matrix": the ``outliers`` largest magnitudes of X; "vector": of each token
        vector (row), ``outliers`` per row.
      fill: what an outlier's entry is quantized as: "min", its group's smallest other entry
        (it then never widens the group's range); "zero", the paper's Quant(X − S).

    Returns:
      dict with ``approx`` (D̂ + L + S, [T, D] fp32), ``quantized`` (D̂), ``low_rank`` (L),
      ``sparse`` (S, dense [T, D] with ``outliers`` non-zeros at most).

    Raises:
      ValueError: ``rank`` outside [0, min(T, D)], ``outliers`` outside [0, T·D] (or [0, D]
        per vector), a ``group_size`` that does not divide D (T for "channel"), or an unknown
        ``axis`` / ``outliers_per`` / ``fill``.
    """
    t, d = x_TD.shape
    for name, value, allowed in (
        ("axis", axis, ("token", "channel")),
        ("outliers_per", outliers_per, ("matrix", "vector")),
        ("fill", fill, ("min", "zero")),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} must be one of {allowed}")
    along = d if axis == "token" else t
    g = along if group_size is None else group_size
    if not 0 <= rank <= min(t, d):
        raise ValueError(f"rank={rank} must be in [0, min(T, D)={min(t, d)}]")
    most = t * d if outliers_per == "matrix" else d
    if not 0 <= outliers <= most:
        raise ValueError(f"outliers={outliers} must be in [0, {most}] ({outliers_per})")
    if g < 1 or along % g:
        raise ValueError(f"group_size={g} must divide {'D' if axis == 'token' else 'T'}={along}")
    x = x_TD.astype(jnp.float32)
    is_out = jnp.zeros((t, d), bool)
    if outliers and outliers_per == "matrix":
        idx = jax.lax.top_k(jnp.abs(x.reshape(-1)), outliers)[1]
        is_out = is_out.reshape(-1).at[idx].set(True).reshape(t, d)
    elif outliers:
        idx = jax.lax.top_k(jnp.abs(x), outliers)[1]
        is_out = jnp.any(idx[..., None] == jnp.arange(d), axis=-2)
    sparse = jnp.where(is_out, x, 0.0)
    # groups on the last axis: [T, D / g, g] ("token") or [D, T / g, g] ("channel")
    grouped = x if axis == "token" else x.T
    out_g = is_out if axis == "token" else is_out.T
    grouped, out_g = (a.reshape(a.shape[0], -1, g) for a in (grouped, out_g))
    if fill == "min":  # the group's smallest other entry: it never widens the group's range
        low = jnp.min(jnp.where(out_g, jnp.inf, grouped), axis=-1, keepdims=True)
        filler = jnp.where(jnp.isinf(low), 0.0, low)
    else:
        filler = 0.0
    dense = jnp.where(out_g, filler, grouped)
    codes, scale, zero = quantize(dense, bits, -1, scale_dtype=jnp.float32)
    quantized = dequantize(codes, scale, zero).reshape(grouped.shape[0], -1)
    quantized = quantized if axis == "token" else quantized.T
    quantized = jnp.where(is_out, 0.0, quantized)  # S holds those entries exactly
    low_rank = jnp.zeros_like(x)
    if rank:
        u, s, vt = jnp.linalg.svd(x - sparse - quantized, full_matrices=False)
        low_rank = (u[:, :rank] * s[:rank]) @ vt[:rank]
    approx = quantized + low_rank + sparse
    return {"approx": approx, "quantized": quantized, "low_rank": low_rank, "sparse": sparse}
