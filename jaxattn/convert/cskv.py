"""CSKV (Wang et al. 2024, "CSKV: Training-Efficient Channel Shrinking for KV Cache in
Long-Context Scenarios", PAPERS.md §2): low-rank K/V projections whose low-dimensional features
are what the cache stores, a bi-branch cache, and a layer-wise reconstruction fine-tune.

* **Channel shrinking.** The key projection ``k = x W_k`` (w_k [D, N_kv·H], ``Linear.as_matrix``)
  becomes ``k = (x A_k) B_k``, A_k [D, r_k], B_k [r_k, N_kv·H]; the same for values. The cache
  holds c_k = x A_k [r_k] and c_v = x A_v [r_v] per token instead of 2·N_kv·H channels.
  :func:`cskv_init` starts from the optimum of the calibration objective
  ``E‖x W − x A B‖²`` (the top right singular vectors V_r of X W: A = W V_r, B = V_rᵀ, the
  Eckart–Young optimum, error = the discarded singular values of X W), computed from the input
  :class:`Moments` by :func:`~jaxattn.convert.feature.feature_lowrank` (a bias is centred and
  folded in: ``k = c B + b'``). At full rank it is exact.
* **Bi-branch cache.** The most recent ``window`` tokens keep their full-precision K and V
  (exact); older tokens keep only their features, optionally RTN-quantized per token
  (:func:`cskv_compress_features`). :func:`cskv_attend` attends over both branches with the
  up-projections absorbed, as MLA decodes: old scores ``q · (c B_k)ᵀ = (q B_kᵀ) · cᵀ`` and
  old outputs ``(p c_v) B_v``, so the old branch never materialises K or V.
* **Training.** Only the factors are trained, by the layer-wise reconstruction loss between
  the original attention output and the compressed one (:func:`cskv_reconstruction_loss`,
  :func:`cskv_train`); no end-to-end retraining.

Keys here carry no RoPE: with RoPE the key features are up-projected before rotation (the
value branch and the score absorption of un-rotated keys are what this module computes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.convert._fit import adam_fit
from jaxattn.convert._stats import Moments
from jaxattn.convert.compensation import _matrix
from jaxattn.convert.feature import feature_lowrank
from jaxattn.convert.rtn import rtn_quantize

__all__ = [
    "cskv_init",
    "cskv_bytes_per_token",
    "cskv_compress_features",
    "cskv_attend",
    "cskv_reconstruction_loss",
    "cskv_train",
]


def cskv_init(w_k, b_k, w_v, b_v, moments: Moments, *, rank_k: int, rank_v: int) -> tuple:
    """The calibration-optimal rank-(r_k, r_v) factors of the K and V projections.

    Args:
      w_k, w_v: the projections [D, N_kv·H] (``Linear.as_matrix``).
      b_k, b_v: their biases [N_kv·H], or None.
      moments: :class:`Moments` of the attention input x [D].
      rank_k, rank_v: the feature widths, in [1, min(D, N_kv·H)].

    Returns:
      ((A_k, B_k, b_k'), (A_v, B_v, b_v'), info): ``k = x A_k B_k + b_k'``; ``info`` has
      ``key`` / ``value``, each :func:`feature_lowrank`'s info (``feature_error`` =
      sqrt(E‖x W − x A B‖²), the discarded spectrum).
    """
    out, info = [], {}
    for name, w, b, r in (("key", w_k, b_k, rank_k), ("value", w_v, b_v, rank_v)):
        try:
            a, bb, bias, i = feature_lowrank(w, b, moments, rank=r, center=b is not None)
        except ValueError as e:
            raise ValueError(f"cskv_init ({name}, rank_{name[0]}={r}): {e}") from None
        out.append((a, bb, bias))
        info[name] = i
    return out[0], out[1], info


def cskv_bytes_per_token(
    *, kv_heads: int, head_dim: int, rank_k: int, rank_v: int, bits: int = 16, full_bits: int = 16
) -> dict:
    """Cache bytes per token of the compressed branch against the full K/V cache.

    Args:
      kv_heads, head_dim: N_kv and H of the original cache (2·N_kv·H values a token).
      rank_k, rank_v: the feature widths (r_k + r_v values a token).
      bits: bits per stored feature (16: unquantized fp16/bf16; 2-8: RTN codes).
      full_bits: bits per value of the original cache.

    Returns:
      ``full`` and ``compressed`` bytes per token, ``saving`` 1 − compressed / full (quantization
      scales excluded: one per token and branch, ``scale_bytes`` adds them at fp16).
    """
    for name, v in (("kv_heads", kv_heads), ("head_dim", head_dim), ("rank_k", rank_k),
                    ("rank_v", rank_v)):  # fmt: skip
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v} must be an int >= 1")
    if bits not in (*range(2, 9), 16) or full_bits not in (8, 16, 32):
        raise ValueError(f"bits={bits} must be 2-8 or 16 and full_bits={full_bits} 8, 16 or 32")
    full = 2 * kv_heads * head_dim * full_bits / 8
    comp = (rank_k + rank_v) * bits / 8
    return {
        "full": full,
        "compressed": comp,
        "saving": 1.0 - comp / full,
        "scale_bytes": 0 if bits == 16 else 2 * 2,
    }


def cskv_compress_features(c_SR, *, bits: int | None = None) -> np.ndarray:
    """The old branch's stored features: c_SR [S, r] as is, or RTN-quantized per token
    (one symmetric scale per row, :func:`~jaxattn.convert.rtn.rtn_quantize`), dequantized."""
    c = _matrix("c_SR", c_SR)
    if bits is None:
        return c
    return rtn_quantize(c.T, bits=bits).T  # per column of cᵀ = per token


def _check_attend(q_TNH, k_SKH, v_SKH, c_k_SR, c_v_SR, b_k_RKH, b_v_RKH, window):
    t, n, h = q_TNH.shape
    s, kv, _ = k_SKH.shape
    if v_SKH.shape != k_SKH.shape or k_SKH.shape[2] != h or n % kv:
        raise ValueError(f"k_SKH {k_SKH.shape} / v_SKH {v_SKH.shape} must be [S, N_kv, H={h}]"
                         f" with N_kv dividing N={n}")  # fmt: skip
    if not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window={window} must be an int >= 0")
    old = max(s - window, 0)
    if c_k_SR.shape[0] != old or c_v_SR.shape[0] != old:
        raise ValueError(f"c_k_SR {c_k_SR.shape} / c_v_SR {c_v_SR.shape} must hold the S − window"
                         f" = {old} old tokens")  # fmt: skip
    if b_k_RKH.shape != (c_k_SR.shape[1], kv, h) or b_v_RKH.shape != (c_v_SR.shape[1], kv, h):
        raise ValueError(f"b_k_RKH {b_k_RKH.shape} / b_v_RKH {b_v_RKH.shape} must be [r, N_kv={kv},"
                         f" H={h}] with r the features' width")  # fmt: skip
    return old


def cskv_attend(
    q_TNH, k_SKH, v_SKH, c_k_SR, c_v_SR, b_k_RKH, b_v_RKH, *, window: int, bk_KH=None, bv_KH=None
):
    """Causal attention of the last T of S tokens over the bi-branch cache (absorbed form).

    Args:
      q_TNH: queries [T, N, H] of positions S − T .. S − 1 (scaled by 1/sqrt(H) here).
      k_SKH, v_SKH: full-precision keys / values [S, N_kv, H]; only the last ``window`` rows
        are read (the exact branch; the older rows may hold anything).
      c_k_SR, c_v_SR: the old branch's features [S − window, r_k] and [.., r_v].
      b_k_RKH, b_v_RKH: the up-projections B reshaped [r, N_kv, H].
      window: the exact branch's length (>= S: everything exact).
      bk_KH, bv_KH: the folded biases b' [N_kv, H] of the old branch, or None.

    Returns:
      o_TNH [T, N, H], float32.
    """
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q_TNH, k_SKH, v_SKH))
    ck, cv = jnp.asarray(c_k_SR, jnp.float32), jnp.asarray(c_v_SR, jnp.float32)
    bk, bv = jnp.asarray(b_k_RKH, jnp.float32), jnp.asarray(b_v_RKH, jnp.float32)
    old = _check_attend(q, k, v, ck, cv, bk, bv, window)
    bk_KH = None if bk_KH is None else jnp.asarray(bk_KH, jnp.float32)
    bv_KH = None if bv_KH is None else jnp.asarray(bv_KH, jnp.float32)
    return _attend(q, k, v, ck, cv, bk, bv, bk_KH, bv_KH, old=old)


@functools.partial(jax.jit, static_argnames="old")
def _attend(q, k, v, ck, cv, bk, bv, bk_KH, bv_KH, *, old):
    t, n, h = q.shape
    s, kv = k.shape[:2]
    g = n // kv
    q_TKGH = q.reshape(t, kv, g, h) / np.sqrt(h)
    # absorbed keys: q · (c B_k)ᵀ = (q B_kᵀ) · cᵀ, the query moved into the r_k-dim feature space
    q_lat_TKGR = jnp.einsum("tkgh,rkh->tkgr", q_TKGH, bk)
    s_old_TKGS = jnp.einsum("tkgr,sr->tkgs", q_lat_TKGR, ck)
    if bk_KH is not None:
        s_old_TKGS += jnp.einsum("tkgh,kh->tkg", q_TKGH, bk_KH)[..., None]
    s_win_TKGS = jnp.einsum("tkgh,skh->tkgs", q_TKGH, k[old:])
    scores = jnp.concatenate([s_old_TKGS, s_win_TKGS], axis=-1)
    pos_T, pos_S = jnp.arange(s - t, s), jnp.arange(s)
    scores = jnp.where((pos_S[None, :] <= pos_T[:, None])[:, None, None], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    # absorbed values: (p c_v) B_v, the up-projection applied once per query, not per token
    z_TKGR = jnp.einsum("tkgs,sr->tkgr", p[..., :old], cv)
    o = jnp.einsum("tkgr,rkh->tkgh", z_TKGR, bv)
    if bv_KH is not None:
        o += p[..., :old].sum(-1)[..., None] * bv_KH[None, :, None]
    o += jnp.einsum("tkgs,skh->tkgh", p[..., old:], v[old:])
    return o.reshape(t, n, h)


def _layer_out(x_SD, w_q, w_k, w_v, w_o, fk, fv, window, kv, h):
    """Attention output [S, D] of one layer; fk / fv = (A, B) factors or None (original)."""
    s = x_SD.shape[0]
    q = (x_SD @ w_q).reshape(s, -1, h)
    k = (x_SD @ w_k).reshape(s, kv, h)
    v = (x_SD @ w_v).reshape(s, kv, h)
    if fk is None:
        o = cskv_attend(q, k, v, jnp.zeros((0, 1)), jnp.zeros((0, 1)), jnp.zeros((1, kv, h)),
                        jnp.zeros((1, kv, h)), window=s)  # fmt: skip
    else:
        ck, cv = x_SD[: s - window] @ fk[0], x_SD[: s - window] @ fv[0]
        o = cskv_attend(q, k, v, ck, cv, fk[1].reshape(-1, kv, h), fv[1].reshape(-1, kv, h),
                        window=window)  # fmt: skip
    return o.reshape(s, -1) @ w_o


def cskv_reconstruction_loss(factors, x_BSD, weights, *, window: int, kv_heads: int):
    """CSKV's layer-wise loss: mean over tokens of ‖attn(x) − attn_cskv(x)‖², the compressed
    layer attending over its bi-branch cache (window exact, older tokens from features).

    Args:
      factors: ((A_k [D, r_k], B_k [r_k, N_kv·H]), (A_v, B_v)), the trained parameters.
      x_BSD: calibration inputs [B, S, D].
      weights: (w_q [D, N·H], w_k, w_v [D, N_kv·H], w_o [N·H, D]), frozen.
      window, kv_heads: the exact branch's length and N_kv.
    """
    w_q, w_k, w_v, w_o = (jnp.asarray(w, jnp.float32) for w in weights)
    h = w_k.shape[1] // kv_heads

    def one(x_SD):
        ref = _layer_out(x_SD, w_q, w_k, w_v, w_o, None, None, window, kv_heads, h)
        got = _layer_out(x_SD, w_q, w_k, w_v, w_o, factors[0], factors[1], window, kv_heads, h)
        return jnp.mean(jnp.sum((ref - got) ** 2, -1))

    return jnp.mean(jax.vmap(one)(jnp.asarray(x_BSD, jnp.float32)))


def cskv_train(factors, x_BSD, weights, *, window: int, kv_heads: int, steps: int, lr: float):
    """Adam on :func:`cskv_reconstruction_loss` for ``steps`` jitted steps (factors only; the
    layer's weights stay frozen).

    Returns:
      (factors as float64 numpy, {"loss": [steps + 1] the loss before each step and at the end}).
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"steps={steps} must be >= 1 and lr={lr} > 0")
    x = jnp.asarray(x_BSD, jnp.float32)
    if x.ndim != 3 or x.shape[1] <= window:
        raise ValueError(f"x_BSD {x.shape} must be [B, S, D] with S > window={window}")
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), factors)

    def loss(p):
        return cskv_reconstruction_loss(p, x, weights, window=window, kv_heads=kv_heads)

    p, hist = adam_fit(loss, p, lr=lr, steps=steps)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), p), {"loss": np.asarray(hist)}
