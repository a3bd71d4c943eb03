"""MoDeGPT on a whole DecoderLM (``jaxattn.convert.modegpt``; PAPERS.md §9), ``models.convert
--method modegpt``.

One compiled calibration pass (:func:`~models._convert_weights.projection_covariances`, on the
source model) gives every block's attention input correlation C = E[x xᵀ] and the SwiGLU hidden
correlation C_σ = E[h hᵀ]. Per block, the MLP (Type I) keeps ``round(keep · H)`` intermediate
dims by Nyström (gate / up columns kept, down compensated) and the value-output pairs (Type III)
are cut to ``round(keep · V)`` value dims per kv head by the SVD of C^½ W_v W_o; the model is
rebuilt with ``mlp_dim`` and each layer's ``v_head_dim`` reduced (a dense, standard-shaped
DecoderLM that ``models.to_hf`` exports when its format holds a separate value head width).

Type II (CR on the key-query pairs) is not applied: it keeps a score-chosen subset of each
head's q/k dims, and every DecoderLM layer rotates q/k by RoPE whose frequencies follow the
head dim (``RopeConfig``), so the kept dims' rotation cannot be written into the rebuilt model
(the paper's Type II acts before RoPE); q and k are kept whole. Statistics come from the
uncompressed model for every block (one pass), not re-gathered after each block.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from jaxattn import convert as C
from jaxattn.convert._stats import Moments
from models._convert_base import _check_no_adapters, logits, with_layers
from models._convert_slicegpt import _build
from models._convert_weights import projection_covariances
from models.decoder import DecoderLM

__all__ = ["modegpt"]

TYPES = ("mlp", "vo")


def _moments(cov: np.ndarray) -> Moments:
    """E[x xᵀ] as :class:`Moments` of one (averaged) token: what the modegpt steps read."""
    return Moments(xx_DD=cov, x_D=np.zeros(cov.shape[0]), count=np.float32(1.0))


def _check(model: DecoderLM, tokens_NT, keep, batch_size) -> None:
    c = model.config
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep={keep!r} must be a number in (0, 1] (the kept share of dims)")
    why = {}
    for i in range(c.num_layers):
        a = c.layer_attention_config(i)
        if c.layer_kind(i) != "mha":
            why[i] = f"attention kind {c.layer_kind(i)!r} (MoDeGPT reads mha layers' W_v, W_o)"
        elif a.qkv_bias:
            why[i] = "a value bias (the Type III module x W_v W_o has none)"
    if c.mlp_bias:
        why["mlp"] = "mlp_bias (the Type I Nyström step has no biases)"
    if c.parameterization != "dense":  # the rebuilt model holds dense kernels of new widths
        why["parameterization"] = f"{c.parameterization!r} (MoDeGPT rebuilds dense kernels)"
    if why:
        raise ValueError(f"modegpt cannot convert this {c.arch!r} model: {why}")
    _check_no_adapters(model)
    t = None if tokens_NT is None else np.asarray(tokens_NT)
    if t is None or t.ndim != 2 or t.shape[0] < batch_size:
        shape = None if t is None else t.shape
        raise ValueError(
            f"modegpt needs calibration tokens [rows >= batch_size={batch_size}, T], got {shape}"
        )


def modegpt(
    model: DecoderLM,
    tokens_NT,
    *,
    keep: float = 0.75,
    types=TYPES,
    ridge: float = 1.0,
    batch_size: int = 8,
    probe_NT=None,
) -> tuple[DecoderLM, list[dict]]:
    """MoDeGPT Type I (MLP, Nyström) and Type III (value-output, SVD) on every block.

    Args:
      model: a dense DecoderLM of "mha" layers without value or MLP biases.
      tokens_NT: calibration tokens [N, T] (rows past a multiple of batch_size unused); at
        least as many tokens as the kept intermediate dims.
      keep: the kept share of the MLP intermediate dims and of each value head's dims, in
        (0, 1]; 1 reconstructs every module exactly (the logits are unchanged).
      types: the module types reduced, a non-empty subset of ("mlp", "vo"); "mlp" alone keeps
        the value head width, so the result exports to the HF GQA formats (one head_dim).
      ridge: the Nyström leverage scores' λ relative to the mean eigenvalue of C_σ.
      batch_size: calibration rows per step.
      probe_NT: tokens for the logit comparison (default the first calibration batch).

    Returns:
      (the compressed model, [report]): ``mlp_relative_error`` and ``vo_relative_error`` (for
        the types reduced) the
      layers' mean module-output errors on the calibration data over the module output's RMS,
      ``vo_relative_error_svd`` the same for per-weight SVD of W_v, W_o at equal parameters,
      ``mean_relative_error`` the mean of the two module errors, ``mlp_dim``, ``v_head_dim``,
      ``max_abs_logit_diff``, ``relative_logit_error`` on the probe and ``parameters``.
    """
    if isinstance(keep, str):
        keep = float(keep)
    if isinstance(ridge, str):
        ridge = float(ridge)
    types = (types,) if isinstance(types, str) else tuple(types)
    if not types or any(t not in TYPES for t in types):
        raise ValueError(f"types={types} must be a non-empty subset of {TYPES}")
    _check(model, tokens_NT, keep, batch_size)
    c = model.config
    k_mlp = max(1, round(keep * c.mlp_dim)) if "mlp" in types else c.mlp_dim
    tokens_NT = np.asarray(tokens_NT)
    used = (tokens_NT.shape[0] // batch_size) * batch_size * tokens_NT.shape[1]
    if "mlp" in types and used < k_mlp:
        raise ValueError(
            f"modegpt: calibration has {used} tokens, fewer than the {k_mlp} kept MLP dims "
            f"(keep={keep} of mlp_dim={c.mlp_dim})"
        )
    covs = projection_covariances(model, tokens_NT, batch_size=batch_size)
    p = C.layer_params(model)
    new, layers, mlp_err, vo_err, vo_svd = dict(p), [], [], [], []
    new["embed"] = {"table": np.asarray(model.embed.table[...])}
    for i in range(c.num_layers):
        pre, a = f"layers/{i}", c.layer_attention_config(i)
        n, kv = p[f"{pre}/attn/o"]["kernel"].shape[0], p[f"{pre}/attn/v"]["kernel"].shape[1]
        dh = a.v
        k_v = max(1, round(keep * dh)) if "vo" in types else dh
        try:
            if "mlp" in types:
                up, gate, down, info = C.modegpt_mlp(
                    p[f"{pre}/mlp/up"]["kernel"],
                    p[f"{pre}/mlp/down"]["kernel"],
                    _moments(covs[f"{pre}/mlp/down"]),
                    rank=k_mlp,
                    w_gate_DH=p[f"{pre}/mlp/gate"]["kernel"],
                    ridge=ridge,
                )
                mlp_err.append(info["relative_error"])
                new[f"{pre}/mlp/up"], new[f"{pre}/mlp/down"] = {"kernel": up}, {"kernel": down}
                new[f"{pre}/mlp/gate"] = {"kernel": gate}
            if "vo" in types:
                w_v = p[f"{pre}/attn/v"]["kernel"].reshape(c.d_model, -1)
                w_o = p[f"{pre}/attn/o"]["kernel"].reshape(-1, c.d_model)
                cov = covs[f"{pre}/attn/v"]
                v_new, o_new, info = C.modegpt_vo(
                    w_v, w_o, _moments(cov), num_heads=n, num_kv_heads=kv, rank=k_v
                )
                total = _vo_total(w_v, w_o, cov, n, kv)
                vo_err.append(info["error"] / total if total > 0 else 0.0)
                vo_svd.append(info["error_svd"] / total if total > 0 else 0.0)
                new[f"{pre}/attn/v"] = {"kernel": v_new.reshape(c.d_model, kv, k_v)}
                o = {"kernel": o_new.reshape(n, k_v, c.d_model)}
                if "bias" in p[f"{pre}/attn/o"]:
                    o["bias"] = p[f"{pre}/attn/o"]["bias"]  # added after W_o: unchanged
                new[f"{pre}/attn/o"] = o
        except ValueError as e:
            raise ValueError(f"modegpt: {pre}: {e}") from None
        layers.append(a if k_v == a.v else dataclasses.replace(a, v_head_dim=k_v))
    cfg = with_layers(c.replace(mlp_dim=k_mlp), layers)
    out_model = _build(cfg, new)
    probe = tokens_NT[:batch_size] if probe_NT is None else np.asarray(probe_NT)
    ref = logits(model, probe).astype(np.float64)
    out = logits(out_model, probe).astype(np.float64)
    flat = nnx.to_flat_state(nnx.state(out_model, nnx.Param))
    count = sum(int(np.prod(v.shape)) for _, v in flat)
    report = {
        "step": "modegpt",
        "mean_relative_error": float(np.mean(mlp_err + vo_err)),
        "mlp_dim": float(k_mlp),
        "v_head_dim": float(layers[0].v),
        "max_abs_logit_diff": float(np.abs(out - ref).max()),
        "relative_logit_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "parameters": float(count),
    }
    for key, errs in (("mlp_relative_error", mlp_err), ("vo_relative_error", vo_err),
                      ("vo_relative_error_svd", vo_svd)):  # fmt: skip
        if errs:
            report[key] = float(np.mean(errs))
    return out_model, [report]


def _vo_total(w_v, w_o, cov, n: int, kv: int) -> float:
    """sqrt(Σ_j E‖x W_v,j [W_o,j1 | … | W_o,jg]‖²): the RMS of the Type III modules' outputs
    (``modegpt_vo``'s error normaliser)."""
    d, g = w_v.shape[0], n // kv
    v = w_v.reshape(d, kv, -1)  # [D, Hkv, V]
    o = w_o.reshape(kv, g, v.shape[2], d)  # [Hkv, g, V, D]
    m = np.einsum("djv,jgve->jdge", v, o).reshape(kv, d, -1)  # W_v,j o_cat_j [Hkv, D, g·D]
    return float(np.sqrt(max(np.einsum("jdx,de,jex->", m, cov, m), 0.0)))
