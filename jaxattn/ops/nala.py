"""``jaxattn.ops.nala``: NaLaFormer's norm-aware feature maps for linear attention.

Meng et al. 2025, "NaLaFormer: Norm-Aware Linear Attention for Transformer Models"
(arXiv 2506.21137; the maps as in the authors' ``NaLaformer/NALA.py``). Linear attention's
normaliser cancels the query norm ‖q‖, which in softmax sets how spiky (low-entropy) the
attention of that query is. NaLa splits q = ‖q‖ · d(q), d(q) = q / ‖q‖, and feeds ‖q‖ back as
the power of the direction's entries, p(‖q‖) = λ (1/2 + tanh ‖q‖): a larger norm raises the
entries of d(q) (all ≤ 1 in magnitude) to a higher power, which concentrates the feature on
its largest entries and so sharpens the normalised attention, as softmax does.

Non-negativity comes from the norm-preserving split ψ(x) = [relu(x), relu(-x)] (2H features;
‖ψ(x)‖ = ‖x‖), instead of a relu that drops the negative half:
ψ(x)·ψ(y) = Σ_i [x_i y_i > 0] x_i y_i, so dimensions where x and y agree in sign (cosine
> 0) add and opposite ones are inhibited, rather than erased for every negative entry.

    φ_q(q) = ψ(d(q)) ^ p(‖q‖)        (elementwise power; ‖q‖ per token and head)
    φ_k(k) = ψ(k ^ key_power)         (odd power 3, as the authors' code)

Both are [..., H] -> [..., 2H], non-negative. Pass ``feature_map="nala"`` to
``jaxattn.ops.linear_attention`` (with ``normalize=True`` for the paper's attention), or
``(nala_query_map, nala_key_map)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["nala_query_map", "nala_key_map", "norm_preserving_split", "nala_power"]

NALA_LAMBDA = 3.0  # λ of p(‖q‖) = λ (1/2 + tanh ‖q‖), the authors' value
NALA_KEY_POWER = 3  # the keys' fixed odd power, the authors' value
_EPS = 1e-6  # keeps d(q) finite for q = 0 (then φ_q(0) = 0)


def norm_preserving_split(x):
    """ψ(x) = [relu(x), relu(-x)] on the last axis: [..., H] -> [..., 2H], ‖ψ(x)‖ = ‖x‖."""
    return jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)


def nala_power(q_norm, lam: float = NALA_LAMBDA):
    """p(‖q‖) = λ (1/2 + tanh ‖q‖): from λ/2 at ‖q‖ = 0 up to 3λ/2, increasing in ‖q‖."""
    return lam * (0.5 + jnp.tanh(q_norm))


def nala_query_map(q, lam: float = NALA_LAMBDA):
    """φ_q(q) = ψ(q / ‖q‖) ^ p(‖q‖), in float32: [..., H] -> [..., 2H], entries in [0, 1].

    Args:
      q: queries [..., H], any float dtype.
      lam: λ of :func:`nala_power` (> 0).

    Returns:
      float32 [..., 2H].
    """
    q = jnp.asarray(q).astype(jnp.float32)  # the power of small entries underflows in bf16
    norm = jnp.sqrt(jnp.sum(q * q, axis=-1, keepdims=True))
    d = norm_preserving_split(q / (norm + _EPS))
    # d ** p with d = 0 allowed: exp(p log d) has a NaN gradient at 0, so mask it
    pos = d > 0
    safe = jnp.where(pos, d, 1.0)
    return jnp.where(pos, jnp.exp(nala_power(norm, lam) * jnp.log(safe)), 0.0)


def nala_key_map(k, key_power: int = NALA_KEY_POWER):
    """φ_k(k) = ψ(k ^ key_power), in float32: [..., H] -> [..., 2H]."""
    k = jnp.asarray(k).astype(jnp.float32)
    return norm_preserving_split(k**key_power)
