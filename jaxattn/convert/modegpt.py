"""MoDeGPT (Lin et al. 2024, "MoDeGPT: Modular Decomposition for Large Language Model
Compression", PAPERS.md §9): a block's matrix pairs are reduced along their shared hidden
dimension by reconstructing the *module output* on calibration data, one decomposition per
module type (the paper's §3.2 and its Algorithms 1-3, as the paper assigns them):

* Type I, MLP ``f(x) = σ(x W_U) W_D`` (gated: ``(σ(x W_G) ⊙ x W_U) W_D``), **Nyström**
  (:func:`modegpt_mlp`): with the intermediate correlation ``C_σ = E[h hᵀ]`` [H, H] of
  h = σ(·), keep the k intermediate dims S of the largest ridge leverage scores
  ``diag(C_σ (C_σ + λ I)⁻¹)``; W_U, W_G keep those columns and the down projection is
  compensated, ``W_D' = (S ᵀC_σ S)⁺ Sᵀ C_σ W_D`` (the least-squares optimum of
  E‖h W_D − h_S W_D'‖² for that S).
* Type II, key-query ``x W_q,h W_k,hᵀ x'ᵀ`` per head, **CR decomposition** (:func:`modegpt_qk`):
  keep the k head dims of the largest ``‖C_q^{1/2}[:, i]‖ ‖C_k^{1/2}[:, i]‖``, where
  ``C_q = W_qᵀ C W_q`` and ``C_k = W_kᵀ C W_k`` are the query / key correlations (C = E[x xᵀ]);
  the same columns of W_q and W_k are kept (the product's column-row sampling, deterministic).
* Type III, value-output ``x W_v,h W_o,h`` per head, **SVD** (:func:`modegpt_vo`): the rank-k
  SVD of ``C^{1/2} W_v W_o``; with its top right singular vectors V_k the head becomes
  ``W_v' = W_v W_o V_k`` [D, k], ``W_o' = V_kᵀ`` (the Eckart–Young optimum of the head's output
  on the calibration tokens, no C⁻¹ needed).

With no reduction (k = full) every module's output is reconstructed exactly on the calibration
data. Errors are the module output's RMS over calibration tokens (for Type II over token pairs,
``E_{x,x'}(xᵀ A x')² = tr(Aᵀ C A C)``), computed from the statistics; ``*_svd`` entries give
naive per-weight SVD of each matrix at the same parameter count (rank ⌈k m / (m + n)⌉ for an
[m, n] matrix whose n-dim side is cut to k). No biases (Llama-family layers), uncentred
correlations as in the paper; RoPE is not handled (Type II is for keys / queries before RoPE).
"""

from __future__ import annotations

import math

import numpy as np

from jaxattn.convert._stats import Moments
from jaxattn.convert.compensation import _matrix

__all__ = ["modegpt_mlp", "modegpt_qk", "modegpt_vo"]


def _second(name: str, moments: Moments, d: int) -> np.ndarray:
    if not isinstance(moments, Moments) or moments.x_D.shape != (d,):
        raise ValueError(f"{name} must be the Moments of a [{d}] vector")
    c = moments.augmented()[:d, :d]
    return (c + c.T) / 2


def _keep(rank, top: int, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= top:
        raise ValueError(f"rank={rank} must be an int in [1, {what} = {top}]")
    return int(rank)


def _heads(name: str, w, d: int, heads: int, axis: int) -> np.ndarray:
    """w [D, H·K] (axis 1) or [H·K, D] (axis 0) as [H, D, K] / [H, K, D]."""
    w = _matrix(name, w)
    if w.shape[1 - axis] != d or w.shape[axis] % heads:
        raise ValueError(f"{name} {w.shape}: needs D = {d} and a multiple of {heads} heads")
    k = w.shape[axis] // heads
    if axis == 1:
        return w.reshape(d, heads, k).transpose(1, 0, 2)
    return w.reshape(heads, k, d)


def _svd_rank(k: int, m: int, n: int) -> int:
    return max(1, min(m, n, math.ceil(k * m / (m + n))))


def _svd(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _rms(x: float) -> float:
    return float(np.sqrt(max(x, 0.0)))


def modegpt_mlp(
    w_up_DH, w_down_HD, moments_h: Moments, *, rank: int, w_gate_DH=None, ridge: float = 1.0
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict]:
    """Type I, Nyström: keep ``rank`` intermediate dims of an MLP (module docstring).

    Args:
      w_up_DH: W_U [D, H]; w_down_HD: W_D [H, O].
      moments_h: calibration :class:`Moments` of the intermediate activation h [H] (the down
        projection's input: σ(x W_U), or σ(x W_G) ⊙ x W_U when gated).
      rank: k intermediate dims kept, in [1, H].
      w_gate_DH: W_G [D, H] of a gated MLP, or None.
      ridge: λ of the leverage scores relative to the mean eigenvalue, λ = ridge · tr(C_σ)/H.

    Returns:
      (W_U' [D, k], W_G' [D, k] or None, W_D' [k, O], info): info has ``kept`` (the intermediate
      indices, ascending), ``error`` sqrt(E‖h W_D − h_S W_D'‖²), ``relative_error`` over
      sqrt(E‖h W_D‖²), ``leverage`` the ridge leverage scores [H].

    Raises:
      ValueError: bad shapes, a rank out of range, ridge < 0, no calibration.
    """
    up, down = _matrix("w_up_DH", w_up_DH), _matrix("w_down_HD", w_down_HD)
    h = up.shape[1]
    if down.shape[0] != h:
        raise ValueError(f"w_down_HD {down.shape} must have H = {h} rows (w_up_DH {up.shape})")
    gate = None if w_gate_DH is None else _matrix("w_gate_DH", w_gate_DH)
    if gate is not None and gate.shape != up.shape:
        raise ValueError(f"w_gate_DH {gate.shape} must have w_up_DH's shape {up.shape}")
    k = _keep(rank, h, "H")
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge} must be >= 0")
    c = _second("moments_h", moments_h, h)
    lam = ridge * np.trace(c) / h
    # diag(C (C + λI)⁻¹); pinv: a dead (all-zero) unit or an all-zero C scores 0, not NaN
    lev = np.diag(np.linalg.pinv(c + lam * np.eye(h), hermitian=True) @ c).copy()
    kept = np.sort(np.argsort(-lev, kind="stable")[:k])
    down_k = np.linalg.pinv(c[np.ix_(kept, kept)]) @ c[kept] @ down  # (SᵀCS)⁺ SᵀC W_D
    diff = down.copy()
    diff[kept] -= down_k
    total = _rms(np.trace(down.T @ c @ down))
    err = _rms(np.trace(diff.T @ c @ diff))
    info = {
        "kept": kept,
        "error": err,
        "relative_error": err / total if total > 0 else 0.0,
        "leverage": lev,
    }
    gate_k = None if gate is None else gate[:, kept]
    return up[:, kept], gate_k, down_k, info


def modegpt_qk(
    w_q_DQ, w_k_DK, moments: Moments, *, num_heads: int, num_kv_heads: int, rank: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Type II, CR decomposition: keep ``rank`` of each key head's dims in W_q and W_k.

    Args:
      w_q_DQ: W_q [D, Hq·dh] (head-major columns); w_k_DK: W_k [D, Hkv·dh].
      moments: calibration :class:`Moments` of the attention input x [D].
      num_heads, num_kv_heads: Hq and Hkv (Hq a multiple of Hkv; a key head's kept dims are
        shared by its query group, scored by sqrt(C_k,ii Σ_g C_q_g,ii)).
      rank: k head dims kept, in [1, dh].

    Returns:
      (W_q' [D, Hq·k], W_k' [D, Hkv·k], info): info has ``kept`` [Hkv, k] per key head,
      ``error`` sqrt(Σ_h E(xᵀ (A_h − A_h') x')²) of the score bilinear forms A_h = W_q,h W_k,hᵀ,
      ``relative_error``, and ``error_svd`` the same for per-weight SVD of every W_q,h, W_k,h
      at the same parameter count.

    Raises:
      ValueError: bad shapes or head counts, a rank out of range, no calibration.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    d = _matrix("w_q_DQ", w_q_DQ).shape[0]
    q = _heads("w_q_DQ", w_q_DQ, d, num_heads, 1)  # [Hq, D, dh]
    kk = _heads("w_k_DK", w_k_DK, d, num_kv_heads, 1)  # [Hkv, D, dh]
    dh = kk.shape[2]
    if q.shape[2] != dh:
        raise ValueError(f"w_q_DQ head dim {q.shape[2]} != w_k_DK head dim {dh}")
    r = _keep(rank, dh, "head dim")
    c = _second("moments", moments, d)
    g = num_heads // num_kv_heads
    gq = np.einsum("hdi,de,hej->hij", q, c, q)  # C_q per query head [Hq, dh, dh]
    gk = np.einsum("hdi,de,hej->hij", kk, c, kk)  # C_k per key head
    kept, err2, tot2, svd2 = [], 0.0, 0.0, 0.0
    rs = _svd_rank(r, d, dh)
    for j in range(num_kv_heads):
        grp = gq[j * g : (j + 1) * g]
        score = np.sqrt(np.einsum("gii->i", grp).clip(min=0) * np.diag(gk[j]).clip(min=0))
        keep = np.sort(np.argsort(-score, kind="stable")[:r])
        drop = np.setdiff1d(np.arange(dh), keep)
        kept.append(keep)
        prod = grp * gk[j]  # tr((QᵀCQ)(KᵀCK)) summed entrywise
        tot2 += prod.sum()
        err2 += prod[:, drop][:, :, drop].sum()
        k_s = _svd(kk[j], rs)
        for qh in q[j * g : (j + 1) * g]:
            a = qh @ kk[j].T - _svd(qh, rs) @ k_s.T
            svd2 += np.trace(a.T @ c @ a @ c)
    kept = np.stack(kept)
    q_idx = np.repeat(kept, g, axis=0)
    q_new = np.take_along_axis(q, q_idx[:, None, :], 2).transpose(1, 0, 2).reshape(d, -1)
    k_new = np.take_along_axis(kk, kept[:, None, :], 2).transpose(1, 0, 2).reshape(d, -1)
    err, total = _rms(err2), _rms(tot2)
    info = {
        "kept": kept,
        "error": err,
        "relative_error": err / total if total > 0 else 0.0,
        "error_svd": _rms(svd2),
    }
    return q_new, k_new, info


def modegpt_vo(
    w_v_DK, w_o_QD, moments: Moments, *, num_heads: int, num_kv_heads: int, rank: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Type III, SVD: each value head's dim cut to ``rank`` via the SVD of C^{1/2} W_v W_o.

    Args:
      w_v_DK: W_v [D, Hkv·dh] (head-major columns); w_o_QD: W_o [Hq·dh, D] (head-major rows).
      moments: calibration :class:`Moments` of the attention input x [D].
      num_heads, num_kv_heads: Hq and Hkv; a value head and the W_o rows of its query group
        form one module ``x W_v [W_o,1 | … | W_o,g]``.
      rank: k value dims kept per kv head, in [1, dh].

    Returns:
      (W_v' [D, Hkv·k], W_o' [Hq·k, D], info): info has ``error`` sqrt(Σ_h E‖x W_v,h W_o,h −
      x W_v,h' W_o,h'‖²) over calibration tokens (= the discarded singular values' norm),
      ``relative_error``, ``error_svd`` for per-weight SVD of every W_v,h, W_o,h at the same
      parameter count, ``error_product_svd`` for the unweighted rank-k SVD of W_v,h W_o,h.

    Raises:
      ValueError: bad shapes or head counts, a rank out of range, no calibration.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    d = _matrix("w_v_DK", w_v_DK).shape[0]
    v = _heads("w_v_DK", w_v_DK, d, num_kv_heads, 1)  # [Hkv, D, dh]
    o = _heads("w_o_QD", w_o_QD, d, num_heads, 0)  # [Hq, dh, D]
    dh = v.shape[2]
    if o.shape[1] != dh:
        raise ValueError(f"w_o_QD head dim {o.shape[1]} != w_v_DK head dim {dh}")
    r = _keep(rank, dh, "head dim")
    c = _second("moments", moments, d)
    g = num_heads // num_kv_heads
    rs = _svd_rank(r, d, dh)
    v_new, o_new, err2, tot2, svd2, psvd2 = [], [], 0.0, 0.0, 0.0, 0.0
    for j in range(num_kv_heads):
        o_cat = np.concatenate(list(o[j * g : (j + 1) * g]), axis=1)  # [dh, g·D]
        lam, e = np.linalg.eigh((v[j].T @ c @ v[j] + (v[j].T @ c @ v[j]).T) / 2)
        f = np.sqrt(lam.clip(min=0))[:, None] * e.T  # Fᵀ F = W_vᵀ C W_v
        _, s, vt = np.linalg.svd(f @ o_cat, full_matrices=False)  # spectrum of C^{1/2} W_v W_o
        v_k = vt[:r].T  # [g·D, k]
        v_new.append(v[j] @ o_cat @ v_k)
        o_new.append(v_k.T.reshape(r, g, d).transpose(1, 0, 2))  # [g, k, D]
        err2 += (s[r:] ** 2).sum()
        tot2 += (s**2).sum()
        m = v[j] @ o_cat
        a_w = m - _svd(v[j], rs) @ np.concatenate(
            [_svd(oh, rs) for oh in o[j * g : (j + 1) * g]], axis=1
        )
        a_p = m - _svd(m, r)
        svd2 += np.trace(a_w.T @ c @ a_w)
        psvd2 += np.trace(a_p.T @ c @ a_p)
    err, total = _rms(err2), _rms(tot2)
    info = {
        "error": err,
        "relative_error": err / total if total > 0 else 0.0,
        "error_svd": _rms(svd2),
        "error_product_svd": _rms(psvd2),
    }
    w_v = np.stack(v_new).transpose(1, 0, 2).reshape(d, -1)
    w_o = np.concatenate(o_new).reshape(-1, d)
    return w_v, w_o, info
