"""LoRD (Kaushal et al. 2023, "LORD: Low Rank Decomposition Of Monolingual Code LLMs For
One-Shot Compression", PAPERS.md §9): each linear layer's weight becomes the product of two
smaller dense matrices, one-shot, no data, and stays an ordinary trainable layer.

For w_IO [m, n] (``Linear.as_matrix``) with thin SVD ``U Σ Vᵀ``, the rank-k factors are
``A = U_k Σ_k^(1/2)`` [m, k] and ``B = Σ_k^(1/2) V_kᵀ`` [k, n]: by Eckart–Young the least
possible ‖W − A B‖_F, ``sqrt(Σ_{i>k} σ_i²)``. The factorised layer has ``k (m + n)``
parameters against ``m n``, a saving exactly when ``k < m n / (m + n)``
(:func:`lord_max_rank` is the largest such k), and costs ``k (m + n)`` multiply-adds a token
through the two chained matmuls. The paper states its compression as a *rank reduction*: one
share ρ of each decomposed layer's full rank is cut (up to 39.58% with < 1% perplexity
increase), so k = ⌊(1 − ρ) min(m, n)⌋ (at least 1; :func:`lord_rank`). On a model,
:func:`lord_linear` writes the factors into a ``jaxattn.layers.Linear`` as its ``lowrank``
form (``W = B_mr A_rn`` there, the same two matrices), keeping its bias.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.convert.compensation import _matrix, svd_compensation
from jaxattn.layers import Linear, factorize

__all__ = ["lord_max_rank", "lord_rank", "lord", "lord_linear"]


def lord_max_rank(m: int, n: int) -> int:
    """The largest k with ``k (m + n) < m n`` (0: no rank saves parameters)."""
    if min(m, n) < 1:
        raise ValueError(f"m={m}, n={n} must be >= 1")
    return (m * n - 1) // (m + n)


def lord_rank(m: int, n: int, reduction: float) -> int:
    """The kept rank ``max(1, ⌊(1 − reduction) min(m, n)⌋)`` for a rank reduction in [0, 1)."""
    if not 0.0 <= reduction < 1.0:
        raise ValueError(f"reduction={reduction} must be in [0, 1)")
    if min(m, n) < 1:
        raise ValueError(f"m={m}, n={n} must be >= 1")
    # the epsilon: a share like 0.5 of 8 must give 4, not 3 from 3.9999999
    return max(1, math.floor((1.0 - reduction) * min(m, n) + 1e-9))


def lord(
    w_IO, *, rank: int | None = None, reduction: float | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """LoRD's rank-k factorisation of ``w_IO`` (module docstring).

    Args:
      w_IO: the weight [m, n].
      rank: k, in [1, min(m, n)] (exclusive with ``reduction``).
      reduction: the rank reduction ρ in [0, 1): k by :func:`lord_rank`.

    Returns:
      (A [m, k], B [k, n], info): ``rank``, ``params_dense`` m n, ``params_factored``
      k (m + n), ``saves`` (the factored form is smaller), ``error`` ‖W − A B‖_F,
      ``relative_error`` that / ‖W‖_F.
    """
    w = _matrix("w_IO", w_IO)
    if (rank is None) == (reduction is None):
        raise ValueError("lord needs exactly one of rank= or reduction=")
    m, n = w.shape
    k = lord_rank(m, n, reduction) if reduction is not None else rank
    a, b, e = svd_compensation(w, np.zeros_like(w), rank=k)  # checks a given rank
    info = {
        "rank": k,
        "params_dense": m * n,
        "params_factored": k * (m + n),
        "saves": k * (m + n) < m * n,
        "error": e["error"],
        "relative_error": e["relative_error"],
    }
    return a, b, info


def lord_linear(
    linear: Linear, *, rank: int | None = None, reduction: float | None = None, path: str = ""
) -> dict:
    """Factorise ``linear`` in place by :func:`lord` into its ``lowrank`` form (bias kept).

    Args:
      linear: a ``jaxattn.layers.Linear`` with its own dense kernel and no adapter.
      rank, reduction: :func:`lord`'s (one of them).
      path: the layer's path, for error messages.

    Returns:
      :func:`lord`'s info.

    Raises:
      ValueError: a rank that saves no parameters (k >= m n / (m + n), naming
        :func:`lord_max_rank`), and :func:`~jaxattn.layers.factorize`'s refusals.
    """
    where = f"the projection at {path!r}" if path else "the projection"
    if not isinstance(linear, Linear):
        raise ValueError(f"linear must be a jaxattn.layers.Linear, got {type(linear).__name__}")
    if linear.form is not None or linear.kernel is None:
        raise ValueError(f"lord_linear: {where} has no dense kernel of its own to decompose")
    w = np.asarray(linear.as_matrix(), np.float64)
    a, b, info = lord(w, rank=rank, reduction=reduction)
    m, n = w.shape
    if not info["saves"]:
        raise ValueError(
            f"lord_linear: rank {info['rank']} for {where} ([{m}, {n}]) saves no parameters: "
            f"k (m + n) < m n needs k <= {lord_max_rank(m, n)}"
        )
    write_lowrank(linear, a, b, path=path)
    return info


def write_lowrank(linear: Linear, a_mk, b_kn, *, path: str = "") -> None:
    """Make ``linear`` (dense, own kernel) compute ``x A B`` in its ``lowrank`` form, in place
    (bias kept): A [m, k], B [k, n] with m, n its fan-in and fan-out."""
    dtype = linear.kernel.dtype
    form = factorize(linear, "lowrank", rank=np.shape(a_mk)[1], rngs=nnx.Rngs(0), path=path)
    form.b.set_value(jnp.asarray(a_mk, dtype))  # the lowrank form's W = b a: b [m, k], a [k, n]
    form.a.set_value(jnp.asarray(b_kn, dtype))
