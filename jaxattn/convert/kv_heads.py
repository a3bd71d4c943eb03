"""KV-head compression, MHA -> GQA (Yu et al. 2024, "Effectively Compress KV Heads for LLM").

:func:`merge_kv_heads` merges each group of ``Gm = K / K'`` kv heads into one, choosing the merged
head to minimise the group's reconstruction error on calibration keys / values (PCA of the
group's outputs, read from the input :class:`Moments`): for values ``v_g ≈ v' U_gᵀ`` with
``U`` [Gm·V, V] the top-V eigenvectors of the group's value covariance, ``U_gᵀ`` folded into
head n's output projection (``o_n <- U_gᵀ o_n``, g the source head n read). Keys without RoPE
are merged the same way, ``U_g`` folded into the queries (``q_n <- q_n U_g``).

RoPE keys: a transform that commutes with the rotation may only mix the *same* frequency pair
across heads, with one coefficient for both dims of the pair. So per pair j the group's pairs
(a_gj, b_gj) merge by the top eigenvector u_j [Gm] of ``Σ_t (a aᵀ + b bᵀ)`` (a and b as two
samples), ``k'_j = Σ_g u_j[g] k_gj``, and query head n's pair j is scaled by u_j[g]. RoPE then
acts on the merged key at its own position (position-consistent), and the result is a standard
GQA layer. Pass-through (non-rotated) dims are merged as keys without RoPE.

Faithful identities (tests): group size 1 is exact; each reported error is the discarded share
of the spectrum, equal to the relative reconstruction error on the calibration tokens, and
never above mean-pooling's (the projection onto the group mean, ``k_g ≈ mean_g k_g``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxattn.convert._params import augmented, split_augmented
from jaxattn.convert._stats import Moments
from jaxattn.layers import AttentionConfig

__all__ = ["merge_kv_heads"]


def _pca(sigma: np.ndarray, keep: int):
    """Top-``keep`` eigenvectors of ``sigma`` and the discarded / total energy."""
    lam, u = np.linalg.eigh(sigma)
    lam, u = np.clip(lam[::-1], 0, None), u[:, ::-1]
    return u[:, :keep], float(lam[keep:].sum()), float(lam.sum())


def _mean_pool_error(sigma: np.ndarray, gm: int) -> float:
    """Energy lost by k_g ≈ mean over the group, for a [Gm·W, Gm·W] group covariance."""
    w = sigma.shape[0] // gm
    p = np.kron(np.ones((gm, gm)) / gm, np.eye(w))  # projection onto the group mean
    return float(np.trace(sigma) - np.trace(p @ sigma))


def _merge_full(w: np.ndarray, m: np.ndarray, gm: int, width: int):
    """Merge [D+1, K, width] heads in groups of gm by PCA: (merged [D+1, K', width],
    U [K', gm, width, width] with v_g ≈ v' U[g]ᵀ, (lost, meanpool lost, total))."""
    d1, k, _ = w.shape
    merged = np.zeros((d1, k // gm, width))
    rot = np.zeros((k // gm, gm, width, width))
    lost = mean = total = 0.0
    for j in range(k // gm):
        wg = w[:, j * gm : (j + 1) * gm].reshape(d1, gm * width)
        sigma = wg.T @ m @ wg
        u, dropped, tot = _pca(sigma, width)
        merged[:, j], rot[j] = wg @ u, u.reshape(gm, width, width)
        lost, total, mean = lost + dropped, total + tot, mean + _mean_pool_error(sigma, gm)
    return merged, rot, (lost, mean, total)


def merge_kv_heads(
    config: AttentionConfig, params: dict, moments: Moments, *, num_kv_heads: int
) -> tuple[AttentionConfig, dict, dict]:
    """Merge an "mha" layer's K kv heads into ``num_kv_heads`` (see the module docstring).

    Args:
      config: the layer's config (MHA or GQA; no qk-norm, K_v = K).
      params: its ``layer_params`` (q, k, v, o, biases).
      moments: calibration :class:`Moments` of the layer input.
      num_kv_heads: K', dividing K.

    Returns:
      (config with num_kv_heads = K'; params; info with ``key_error`` / ``value_error`` (the
      discarded spectrum's share) and ``key_error_meanpool`` / ``value_error_meanpool``).

    Raises:
      ValueError: K' not dividing K, qk-norm, separate value heads.
    """
    c = config
    if not isinstance(c, AttentionConfig):
        raise ValueError(f"merge_kv_heads needs an 'mha' layer, got {type(c).__name__}")
    k, n, h, vd = c.n_kv, c.n_q, c.h, c.v
    if (
        not isinstance(num_kv_heads, (int, np.integer))
        or not 1 <= num_kv_heads <= k
        or k % num_kv_heads
    ):
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide the layer's {k} kv heads")
    if c.qk_norm:
        raise ValueError(
            "merge_kv_heads: qk_norm normalises each key head, so heads do not merge linearly"
        )
    if c.n_v != k:
        raise ValueError(f"merge_kv_heads needs num_v_heads == num_kv_heads, got {c.n_v} != {k}")
    gm, m = k // num_kv_heads, moments.augmented()
    src = np.arange(n) // (n // k)  # source kv head of query head n
    local = src % gm  # its index within its merged group

    wv, rot_v, (v_lost, v_mean, v_total) = _merge_full(augmented(params["v"], (k, vd)), m, gm, vd)
    o = np.asarray(params["o"]["kernel"], np.float64)
    o_new = np.stack([rot_v[src[i] // gm, local[i]].T @ o[i] for i in range(n)])

    wk = augmented(params["k"], (k, h))
    wq = augmented(params["q"], (n, h)).copy()
    rotary = 0 if c.rope is None else (c.rope.rotary_dim or h)
    k_new = np.zeros((wk.shape[0], num_kv_heads, h))
    k_lost = k_mean = k_total = 0.0
    if rotary:
        j = np.arange(rotary // 2)
        a_j, b_j = (j, j + rotary // 2) if c.rope.layout == "split_half" else (2 * j, 2 * j + 1)
        for grp in range(num_kv_heads):
            heads = np.arange(grp * gm, (grp + 1) * gm)
            for a, b in zip(a_j, b_j, strict=True):
                wa, wb = wk[:, heads, a], wk[:, heads, b]  # [D+1, Gm]
                sigma = wa.T @ m @ wa + wb.T @ m @ wb
                u, dropped, tot = _pca(sigma, 1)
                k_new[:, grp, a], k_new[:, grp, b] = wa @ u[:, 0], wb @ u[:, 0]
                k_lost, k_total = k_lost + dropped, k_total + tot
                k_mean += float(np.trace(sigma) - sigma.sum() / gm)
                for i in np.nonzero(src // gm == grp)[0]:  # the pair's query, scaled by u_j[g]
                    wq[:, i, [a, b]] *= u[local[i], 0]
    if rotary < h:  # pass-through dims: merged as keys without RoPE, U_g folded into q
        rest = np.arange(rotary, h)
        merged, rot_k, (lost, mean, tot) = _merge_full(wk[:, :, rest], m, gm, len(rest))
        k_new[:, :, rest] = merged
        for i in range(n):
            wq[:, i, rest] = wq[:, i, rest] @ rot_k[src[i] // gm, local[i]]
        k_lost, k_mean, k_total = k_lost + lost, k_mean + mean, k_total + tot

    new = dataclasses.replace(c, num_kv_heads=num_kv_heads)
    out = {
        "q": split_augmented(wq, c.qkv_bias),
        "k": split_augmented(k_new, c.qkv_bias),
        "v": split_augmented(wv, c.qkv_bias),
        "o": {"kernel": o_new, **({"bias": params["o"]["bias"]} if c.o_bias else {})},
    }
    for name in ("q_norm", "k_norm"):
        if name in params:
            out[name] = params[name]

    def share(x, total):
        return x / total if total > 0 else 0.0

    info = {
        "key_error": share(k_lost, k_total),
        "key_error_meanpool": share(k_mean, k_total),
        "value_error": share(v_lost, v_total),
        "value_error_meanpool": share(v_mean, v_total),
    }
    return new, out, info
