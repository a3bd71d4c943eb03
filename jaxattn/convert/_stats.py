"""Calibration statistics of a layer's input, accumulated over batches (sums, merged by +).

Every linear statistic a conversion needs (the covariance of keys before RoPE, of a KV latent,
of any affine projection ``x W + b``) is a function of the input's first and second moments:
``E[(x̃ W̃)ᵀ (x̃ W̃)] = W̃ᵀ E[x̃ x̃ᵀ] W̃`` with ``x̃ = [x, 1]`` and ``W̃ = [W; b]``. So one pass
gathers :class:`Moments` per layer (through the hooks, ``models.convert.calibrate``) and every
step reads its covariances from them. :class:`LatentNormStats` holds the per-token nonlinear
sums a fitted RMSNorm needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = ["Moments", "input_moments", "LatentNormStats", "latent_norm_stats", "covariance"]


@struct.dataclass
class Moments:
    """Sums over calibration tokens of a layer input x [D]: Σ x xᵀ, Σ x and the count.

    Attributes:
      xx_DD: Σ x xᵀ (float32 sums; fp64 on the host after :meth:`augmented`).
      x_D: Σ x.
      count: the number of tokens (float32 scalar array).
    """

    xx_DD: jax.Array
    x_D: jax.Array
    count: jax.Array

    def __add__(self, other: Moments) -> Moments:
        return jax.tree.map(jnp.add, self, other)

    def augmented(self) -> np.ndarray:
        """E[x̃ x̃ᵀ] of x̃ = [x, 1], float64 [D + 1, D + 1] (the bias row is the last)."""
        n = float(self.count)
        if n <= 0:
            raise ValueError("Moments hold no tokens")
        d = self.x_D.shape[0]
        m = np.empty((d + 1, d + 1), np.float64)
        m[:d, :d] = np.asarray(self.xx_DD, np.float64)
        m[:d, d] = m[d, :d] = np.asarray(self.x_D, np.float64)
        m[d, d] = n
        return m / n


def input_moments(x_BTD: jax.Array, weights_BT: jax.Array | None = None) -> Moments:
    """:class:`Moments` of the rows of x_BTD [B, T, D] (fp32 sums; ``weights_BT`` 0/1 masks)."""
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1]).astype(jnp.float32)
    w_N = jnp.ones(x_ND.shape[:1], jnp.float32) if weights_BT is None else weights_BT.reshape(-1)
    xw_ND = x_ND * w_N[:, None]
    # fp32 with HIGHEST precision: the covariance's small eigenvalues decide the PCA tail
    xx_DD = jnp.einsum("nd,ne->de", xw_ND, x_ND, precision=jax.lax.Precision.HIGHEST)
    return Moments(xx_DD=xx_DD, x_D=xw_ND.sum(0), count=w_N.sum())


def covariance(moments: Moments, w_aug: np.ndarray) -> np.ndarray:
    """E[yᵀy] of the affine map y = x̃ W̃, for W̃ [D + 1, F] (weights then the bias row)."""
    m = moments.augmented()
    if w_aug.shape[0] != m.shape[0]:
        raise ValueError(f"w_aug {w_aug.shape} must have D + 1 = {m.shape[0]} rows")
    return w_aug.T @ m @ w_aug


@struct.dataclass
class LatentNormStats:
    """Per-dim sums over tokens for fitting an RMSNorm scale g to a latent c [L].

    With r = sqrt(mean(c²) + eps) per token: ``s0 = Σ c²``, ``s1 = Σ c² / r``,
    ``s2 = Σ c² / r²``. The least-squares g of ``c ≈ g ⊙ c / r`` is ``s1 / s2`` per dim, and
    the remaining error is ``s0 - s1² / s2``.
    """

    s0_L: jax.Array
    s1_L: jax.Array
    s2_L: jax.Array

    def __add__(self, other: LatentNormStats) -> LatentNormStats:
        return jax.tree.map(jnp.add, self, other)


def latent_norm_stats(c_BTL: jax.Array, eps: float) -> LatentNormStats:
    """:class:`LatentNormStats` of the latent rows c_BTL [B, T, L] (fp32)."""
    c = c_BTL.reshape(-1, c_BTL.shape[-1]).astype(jnp.float32)
    c2 = c * c
    inv_r = jax.lax.rsqrt(jnp.mean(c2, axis=-1, keepdims=True) + eps)
    return LatentNormStats(s0_L=c2.sum(0), s1_L=(c2 * inv_r).sum(0), s2_L=(c2 * inv_r**2).sum(0))
