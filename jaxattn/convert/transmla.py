"""TransMLA (Meng et al. 2025, arXiv 2502.07864): a GQA layer rewritten as MLA, step by step.

Each step is a pure function ``(config, params[, stats], **options) -> (config, params, info)``
on one layer: ``params`` is :func:`jaxattn.convert.layer_params`' nested dict of float64 arrays,
``stats`` calibration :class:`Moments` of the layer input x [D] (or :class:`LatentNormStats`),
``info`` the step's measured error. Shapes: D model, N query heads, K kv heads, G = N / K,
H head dim, V value dim, L latent, P rope key.

1. :func:`gqa_to_mla` (exact). The K pre-RoPE keys side by side are the rope key,
   ``k_pe = x Wk`` [K·H], rotated per block of H (``rope_block_dim=H``): block g is kv head g.
   Head n's rope query is its query in block g(n) and zeros elsewhere, so
   ``q_pe_n · k_pe = q_n · k_g(n)`` at every position pair. The latent is the K values
   ``c = x Wv`` [K·V] (``kv_norm=False``) and ``v_b`` copies value head g(n) to head n.
   Cache per token: L + P = K·V + K·H, GQA's. Biases (Qwen2) ride along as ``q_bias`` /
   ``kv_bias``; the logit scale H^-1/2 is folded into the query so the MLA default applies.
2. :func:`decouple_rope` (the paper's RoRoPE + FreqFold). Per frequency, the K heads' pairs
   (a, b) rotate by the same angle, so an orthogonal mix across heads (the same for a and b)
   commutes with RoPE. PCA over heads (× ``freqfold`` adjacent frequencies, treated as one)
   on the calibration keys, a and b as two samples, puts the energy in the first components;
   the top ``freqfold / collapse`` of each group stay rotated (a standard rope key of
   P' = H / collapse dims at frequencies ``i·freqfold + r·collapse`` of the H-dim head), the
   rest lose their rotation and join the latent as key dims (read by ``k_b``; each head's
   query for them is factored to H dims by SVD, exact at rank H). Cache bytes are unchanged.
   Exact when nothing is dropped (K = 1, freqfold = collapse = 1); otherwise the discarded
   share of the rope energy is reported.
3. :func:`compress_latent`: PCA of the latent ``c = x Wc + b`` on the calibration covariance
   (keys first rescaled to the values' norm, the paper's KV balancing, undone in ``k_b``),
   kept to ``kv_lora_rank``: ``Wc R``, ``Rᵀ k_b``, ``Rᵀ v_b``. The discarded eigenvalue share
   is reported; at full rank it is an exact rotation.
4. :func:`fit_latent_norm`: the RMSNorm DeepSeek applies to the latent, its scale fitted by
   least squares (per dim) so ``g ⊙ c / rms(c) ≈ c`` on the calibration tokens; lossy, the
   residual share is reported. Needed for a Hugging Face DeepSeek-V3 export.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxattn.convert._params import augmented, split_augmented
from jaxattn.convert._stats import LatentNormStats, Moments, covariance
from jaxattn.layers import AttentionConfig, MLAConfig
from jaxattn.ops.rope import rope_frequencies

__all__ = ["gqa_to_mla", "decouple_rope", "compress_latent", "fit_latent_norm", "gqa_unsupported"]


def gqa_unsupported(config) -> list[str]:
    """Why a layer config cannot be converted by :func:`gqa_to_mla` (empty: it can)."""
    if not isinstance(config, AttentionConfig):
        return [f"its kind is {getattr(config, 'kind', type(config).__name__)!r}, not 'mha'"]
    c, why = config, []
    if c.rope is None:
        why.append("rope=None (TransMLA moves RoPE'd keys; a rope-free layer has none)")
    elif c.rope.rotary_dim not in (None, c.h):
        why.append(f"partial rotary (rope.rotary_dim={c.rope.rotary_dim} < head_dim={c.h})")
    if c.n_q != c.num_heads:
        why.append(f"SQA (num_query_heads={c.n_q})")
    if c.n_v != c.n_kv:
        why.append(f"num_v_heads={c.n_v} != num_kv_heads={c.n_kv}")
    for name in ("qk_norm", "o_bias"):
        if getattr(c, name):
            why.append(f"{name}=True (MLA has none)")
    for name in ("logits_soft_cap", "sliding_window", "cache"):
        if getattr(c, name) is not None:
            why.append(f"{name}={getattr(c, name)!r} (MLA has none)")
    return why


def gqa_to_mla(config: AttentionConfig, params: dict) -> tuple[MLAConfig, dict, dict]:
    """The exact MLA form of a GQA layer (step 1; see the module docstring).

    Args:
      config: the "mha" layer's config (Llama / Qwen2 / Mistral as ``models.from_hf`` loads).
      params: its ``layer_params``: q, k, v, o (+ q/k/v biases).

    Returns:
      (MLAConfig with P = K·H, rope_block_dim = H, L = K·V, nope 0, kv_norm False; its params;
      info ``{"exact": True}``).

    Raises:
      ValueError: a layer this construction cannot hold exactly (every reason listed).
    """
    why = gqa_unsupported(config)
    if why:
        raise ValueError("TransMLA cannot convert this layer: " + "; ".join(why))
    c = config
    d, n, k, h, vd = c.d_model, c.n_q, c.n_kv, c.h, c.v
    new = MLAConfig(
        d_model=d,
        num_heads=n,
        kv_lora_rank=k * vd,
        qk_nope_head_dim=0,
        qk_rope_head_dim=k * h,
        v_head_dim=vd,
        rope=dataclasses.replace(c.rope, rotary_dim=None),
        rope_block_dim=h,
        kv_norm=False,
        q_bias=c.qkv_bias,
        kv_bias=c.qkv_bias,
        dropout=c.dropout,
        implementation=c.implementation,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
    )
    f = _scale(c) / new.scale  # the GQA logit scale, folded into the query
    g_n = np.arange(n) // (n // k)  # kv head of query head n
    heads = np.arange(n)
    wq = augmented(params["q"], (n, h)) * f  # [D+1, N, H]
    q = np.zeros((d + 1, n, k, h))
    q[:, heads, g_n, :] = wq
    kv_a = np.concatenate(
        [augmented(params["v"], (k, vd)).reshape(d + 1, k * vd)]
        + [augmented(params["k"], (k, h)).reshape(d + 1, k * h)],
        axis=1,
    )
    v_b = np.zeros((k, vd, n, vd))
    for i in range(n):
        v_b[g_n[i], :, i, :] = np.eye(vd)
    out = {
        "q": split_augmented(q.reshape(d + 1, n, k * h), c.qkv_bias),
        "kv_a": split_augmented(kv_a, c.qkv_bias),
        "v_b": {"kernel": v_b.reshape(k * vd, n, vd)},
        "o": {"kernel": np.asarray(params["o"]["kernel"], np.float64)},
    }
    return new, out, {"exact": True}


def _scale(c: AttentionConfig) -> float:
    return c.softmax_scale if c.softmax_scale is not None else 1.0 / math.sqrt(c.h)


def _pairs(layout: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The dims (a_j, b_j) RoPE rotates together, j < width / 2, in ``layout``."""
    j = np.arange(width // 2)
    if layout == "split_half":
        return j, j + width // 2
    return 2 * j, 2 * j + 1  # interleaved (and interleaved_to_split_half's input pairs)


def _check_latent_free(c: MLAConfig, step: str) -> None:
    if not isinstance(c, MLAConfig):
        raise ValueError(f"{step} needs an MLAConfig layer, got {type(c).__name__}")
    if c.kv_norm:
        raise ValueError(
            f"{step} needs a latent without RMSNorm (kv_norm=False): the step changes the "
            "latent linearly, which a per-token norm does not commute with"
        )


def decouple_rope(
    config: MLAConfig,
    params: dict,
    moments: Moments,
    *,
    rope_dim: int | None = None,
    freqfold: int | None = None,
) -> tuple[MLAConfig, dict, dict]:
    """RoRoPE + FreqFold (step 2): keep RoPE on a ``rope_dim``-wide decoupled key.

    Args:
      config: an MLA layer with ``rope_block_dim`` (the exact form of :func:`gqa_to_mla`),
        no query bottleneck and no latent norm.
      params: its ``layer_params``.
      moments: calibration :class:`Moments` of the layer's input.
      rope_dim: P', the rotated key width (default the block width H); H / P' = collapse.
      freqfold: adjacent frequencies PCA'd together (default collapse); a multiple of
        collapse dividing H / 2.

    Returns:
      (config with P = rope_dim and standard rope, L grown by K·H - P'; params; info with
      ``discarded_rope_energy`` (share of the keys' rotated energy whose rotation is removed),
      ``q_factor_residual`` (share of the query lost in the rank-H factoring; 0 for GQA)).

    Raises:
      ValueError: a layer without rope blocks, bad rope_dim / freqfold, a rope scaling whose
        frequencies change with the width when collapse > 1.
    """
    c = config
    _check_latent_free(c, "decouple_rope")
    if c.rope_block_dim is None or c.rope is None:
        raise ValueError("decouple_rope needs a layer whose rope key is in blocks (rope_block_dim)")
    if c.q_lora_rank:
        raise ValueError(f"decouple_rope needs q_lora_rank=0, got {c.q_lora_rank}")
    hb, p, l_old, n = c.rope_block_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.num_heads
    rope_dim = hb if rope_dim is None else int(rope_dim)
    if rope_dim <= 0 or rope_dim % 2 or hb % rope_dim:
        raise ValueError(f"rope_dim={rope_dim} must be even and divide the head dim {hb}")
    collapse = hb // rope_dim
    freqfold = collapse if freqfold is None else int(freqfold)
    if freqfold <= 0 or freqfold % collapse or (hb // 2) % freqfold:
        raise ValueError(
            f"freqfold={freqfold} must be a multiple of collapse={collapse} (head dim {hb} / "
            f"rope_dim {rope_dim}) and divide head_dim / 2 = {hb // 2}"
        )
    new_rope = dataclasses.replace(c.rope, rotary_dim=None)
    _check_collapse(c.rope, new_rope, hb, rope_dim, collapse)
    kb, keep = p // hb, freqfold // collapse
    a_in, b_in = _pairs(c.rope.layout, hb)
    a_out, b_out = _pairs(c.rope.layout, rope_dim)

    kv_a = augmented(params["kv_a"], (l_old + p,))
    sigma = covariance(moments, kv_a[:, l_old:])  # pre-RoPE rope-key covariance [P, P]
    rot = np.zeros((p, p))  # new coordinates: rope_dim kept (at their pair dims), then dropped
    col, kept, total = rope_dim, 0.0, 0.0
    for i in range((hb // 2) // freqfold):
        js = i * freqfold + np.arange(freqfold)
        fa = (np.arange(kb)[:, None] * hb + a_in[js][None, :]).reshape(-1)
        fb = (np.arange(kb)[:, None] * hb + b_in[js][None, :]).reshape(-1)
        lam, u = np.linalg.eigh(sigma[np.ix_(fa, fa)] + sigma[np.ix_(fb, fb)])
        lam, u = np.clip(lam[::-1], 0, None), u[:, ::-1]
        kept, total = kept + lam[:keep].sum(), total + lam.sum()
        for r in range(kb * freqfold):
            if r < keep:  # component r of group i turns at frequency i·freqfold + r·collapse
                m = i * keep + r
                rot[fa, a_out[m]], rot[fb, b_out[m]] = u[:, r], u[:, r]
            else:
                rot[fa, col], rot[fb, col + 1] = u[:, r], u[:, r]
                col += 2
    pd = p - rope_dim

    nope_old = c.qk_nope_head_dim
    wq = augmented(params["q"], (n, nope_old + p))  # [D+1, N, nope + P]
    q_pe = np.einsum("dnp,pk->dnk", wq[:, :, nope_old:], rot)
    h = min(hb, pd, wq.shape[0])
    a_q = np.zeros((wq.shape[0], n, h))
    b_q = np.zeros((h, n, pd))
    lost = 0.0
    for i in range(n if h else 0):  # each head's query for the de-rotated dims, rank h
        u, s, vt = np.linalg.svd(q_pe[:, i, rope_dim:], full_matrices=False)
        a_q[:, i], b_q[:, i] = u[:, :h] * s[:h], vt[:h]
        lost += float((s[h:] ** 2).sum())
    q_energy = float((q_pe[:, :, rope_dim:] ** 2).sum())

    new = dataclasses.replace(
        c,
        kv_lora_rank=pd + l_old,
        qk_nope_head_dim=nope_old + h,
        qk_rope_head_dim=rope_dim,
        rope=new_rope,
        rope_block_dim=None,
    )
    f = c.scale / new.scale
    q_new = np.concatenate([wq[:, :, :nope_old], a_q, q_pe[:, :, :rope_dim]], axis=-1) * f
    k_rope = kv_a[:, l_old:] @ rot
    kv_new = np.concatenate([k_rope[:, rope_dim:], kv_a[:, :l_old], k_rope[:, :rope_dim]], axis=1)
    k_b = np.zeros((pd + l_old, n, nope_old + h))
    k_b[:pd, :, nope_old:] = b_q.transpose(2, 1, 0)
    if nope_old:
        k_b[pd:, :, :nope_old] = params["k_b"]["kernel"]
    v_b = np.concatenate([np.zeros((pd, n, c.v_head_dim)), params["v_b"]["kernel"]], axis=0)
    out = {
        "q": split_augmented(q_new, c.q_bias),
        "kv_a": split_augmented(kv_new, c.kv_bias),
        "v_b": {"kernel": v_b},
        "o": {"kernel": params["o"]["kernel"]},
    }
    if new.qk_nope_head_dim:
        out["k_b"] = {"kernel": k_b}
    info = {
        "discarded_rope_energy": 1.0 - kept / total if total > 0 else 0.0,
        "q_factor_residual": lost / q_energy if q_energy > 0 else 0.0,
        "collapse": collapse,
        "freqfold": freqfold,
    }
    return new, out, info


def _check_collapse(rope, new_rope, hb: int, rope_dim: int, collapse: int) -> None:
    """A collapsed key turns at every collapse-th frequency of the H-dim head: its own
    frequencies (rope over rope_dim dims) must be exactly those."""
    if collapse == 1:
        return
    f_h, att_h = rope_frequencies(rope, hb)
    f_p, att_p = rope_frequencies(new_rope, rope_dim)
    if att_h != att_p or not np.allclose(np.asarray(f_h)[::collapse], np.asarray(f_p), rtol=1e-6):
        raise ValueError(
            f"rope_dim={rope_dim} < head dim {hb}: this rope's frequencies "
            f"({type(rope.scaling).__name__}) change with the rotated width, so every "
            f"{collapse}-th frequency of the head is not a rope over {rope_dim} dims; use "
            f"rope_dim={hb}"
        )


def compress_latent(
    config: MLAConfig,
    params: dict,
    moments: Moments,
    *,
    kv_lora_rank: int,
    balance_kv: bool = True,
) -> tuple[MLAConfig, dict, dict]:
    """PCA of the KV latent to ``kv_lora_rank`` dims (step 3; see the module docstring).

    Args:
      config: an MLA layer without latent norm.
      params: its ``layer_params``.
      moments: calibration :class:`Moments` of the layer input (at least kv_lora_rank tokens).
      kv_lora_rank: the new L, in [1, config.kv_lora_rank].
      balance_kv: rescale the latent's key rows to the value rows' mean norm first (the
        paper's KV balancing; needs rows that feed keys or values, not both).

    Returns:
      (config with the new L; params; info with ``discarded_latent_energy``, the dropped
      eigenvalues' share of the (balanced) latent covariance's trace, and ``kv_ratio``).

    Raises:
      ValueError: a rank outside [1, L], too few calibration tokens, a latent norm.
    """
    c = config
    _check_latent_free(c, "compress_latent")
    l_old, r = c.kv_lora_rank, kv_lora_rank
    if not isinstance(r, (int, np.integer)) or not 1 <= r <= l_old:
        raise ValueError(f"kv_lora_rank={r} must be an int in [1, {l_old}] (the current latent)")
    if float(moments.count) < r:
        raise ValueError(
            f"calibration has {int(moments.count)} tokens, fewer than kv_lora_rank={r}: "
            "the latent covariance cannot have that rank; give more calibration tokens"
        )
    kv_a = augmented(params["kv_a"], (l_old + c.qk_rope_head_dim,))
    w_c = kv_a[:, :l_old]
    k_b = params["k_b"]["kernel"] if "k_b" in params else None
    v_b = params["v_b"]["kernel"]
    scale = np.ones(l_old)
    ratio = 1.0
    if balance_kv and k_b is not None:
        reads_k = np.abs(k_b).reshape(l_old, -1).max(1) > 0
        reads_v = np.abs(v_b).reshape(l_old, -1).max(1) > 0
        if (reads_k & reads_v).any():
            raise ValueError(
                "balance_kv needs latent rows that feed keys or values, not both; "
                "pass balance_kv=False"
            )
        std = np.sqrt(np.clip(np.diag(covariance(moments, w_c)), 0, None))
        if reads_k.any() and reads_v.any() and std[reads_v].mean() > 0:
            ratio = float(std[reads_k].mean() / std[reads_v].mean())
            if ratio > 0:
                scale[reads_k] = 1.0 / ratio
    w_c = w_c * scale
    lam, rot = np.linalg.eigh(covariance(moments, w_c))
    lam, rot = np.clip(lam[::-1], 0, None), rot[:, ::-1][:, :r]
    new = dataclasses.replace(c, kv_lora_rank=r)
    out = {
        "q": params["q"],
        "kv_a": split_augmented(np.concatenate([w_c @ rot, kv_a[:, l_old:]], axis=1), c.kv_bias),
        "v_b": {"kernel": np.einsum("lnv,lr->rnv", v_b, rot)},
        "o": params["o"],
    }
    if k_b is not None:
        out["k_b"] = {"kernel": np.einsum("lnh,lr->rnh", k_b / scale[:, None, None], rot)}
    info = {
        "discarded_latent_energy": float(lam[r:].sum() / lam.sum()) if lam.sum() > 0 else 0.0,
        "kv_ratio": ratio,
    }
    return new, out, info


def fit_latent_norm(
    config: MLAConfig, params: dict, stats: LatentNormStats
) -> tuple[MLAConfig, dict, dict]:
    """Add DeepSeek's latent RMSNorm, its scale fitted on calibration latents (step 4).

    Args:
      config: an MLA layer with ``kv_norm=False``.
      params: its ``layer_params``.
      stats: :class:`LatentNormStats` of the layer's latent on calibration tokens (with
        ``config.latent_norm_eps``).

    Returns:
      (config with kv_norm=True; params with ``kv_norm/scale`` g = s1 / s2; info with
      ``latent_norm_residual``, Σ‖c - g ⊙ c / rms(c)‖² / Σ‖c‖²).
    """
    _check_latent_free(config, "fit_latent_norm")
    s0, s1, s2 = (np.asarray(a, np.float64) for a in (stats.s0_L, stats.s1_L, stats.s2_L))
    if s0.shape != (config.kv_lora_rank,):
        raise ValueError(f"stats are for L={s0.shape[0]}, the layer has {config.kv_lora_rank}")
    live = s2 > 0
    g = np.where(live, s1 / np.where(live, s2, 1.0), 1.0)
    residual = float((s0 - np.where(live, s1 * g, 0.0)).sum() / max(s0.sum(), 1e-30))
    new = dataclasses.replace(config, kv_norm=True)
    return new, {**params, "kv_norm": {"scale": g}}, {"latent_norm_residual": residual}
