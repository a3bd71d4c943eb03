"""Round-to-nearest (RTN) weight quantization, the baseline quantizer of ZeroQuant-V2 (§9).

A weight matrix w_IO [I, O] in the ``x · W`` layout (``Linear.as_matrix``) is quantized per
output column o, in groups of ``group_size`` consecutive input rows (``None``: the whole column,
i.e. per-channel), to ``bits``-bit integer codes:

  symmetric:   s = max|w_g| / (2^(b-1) - 1),  q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1),
               Q(w) = s · q
  asymmetric:  s = (max w_g - min w_g) / (2^b - 1),  z = round(-min w_g / s),
               q = clip(round(w / s) + z, 0, 2^b - 1),  Q(w) = s · (q - z)

A group whose scale is 0 (symmetric: all zero; asymmetric: all equal) is kept as it is.
The result is the dequantized float64 matrix, what a compensation (LoRC, EoRA) corrects.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rtn_quantize"]


def rtn_quantize(
    w_IO: np.ndarray, *, bits: int = 4, group_size: int | None = None, symmetric: bool = True
) -> np.ndarray:
    """RTN-quantize and dequantize ``w_IO`` (see the module docstring).

    Args:
      w_IO: the weight matrix [I, O] (x · W layout).
      bits: code width, 2 to 8.
      group_size: input rows sharing one scale per output column; must divide I (None: I).
      symmetric: symmetric codes around 0 (else asymmetric with a zero point).

    Returns:
      Q(W) [I, O], float64.

    Raises:
      ValueError: bits outside [2, 8], a group size not dividing I, a non-2-D or non-finite w.
    """
    w = np.asarray(w_IO, np.float64)
    if w.ndim != 2:
        raise ValueError(f"rtn_quantize: w_IO must be a matrix [I, O], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("rtn_quantize: w_IO has non-finite entries")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"rtn_quantize: bits={bits} must be an int in [2, 8]")
    i, o = w.shape
    g = i if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 or i % g:
        raise ValueError(f"rtn_quantize: group_size={group_size} must divide the {i} input rows")
    w_GgO = w.reshape(i // g, g, o)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        s = np.abs(w_GgO).max(axis=1, keepdims=True) / top
        safe = np.where(s > 0, s, 1.0)
        q = np.clip(np.round(w_GgO / safe), -top - 1, top)
        out = q * s
    else:
        top = 2**bits - 1
        lo, hi = w_GgO.min(axis=1, keepdims=True), w_GgO.max(axis=1, keepdims=True)
        s = (hi - lo) / top
        safe = np.where(s > 0, s, 1.0)
        z = np.round(-lo / safe)
        q = np.clip(np.round(w_GgO / safe) + z, 0, top)
        out = (q - z) * s
    out = np.where(s > 0, out, w_GgO)  # a zero-scale group is constant: kept exactly
    return out.reshape(i, o)
