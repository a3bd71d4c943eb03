"""Data-free weight compression of every block projection of a DecoderLM (PAPERS.md §9):
ZeroQuant-V2 LoRC, LoRD, TRP's truncation and WeLore, reached by ``models.convert`` by name.

Each method reads the attention q / k / v / o and MLP gate / up / down of every layer as a
matrix (``Linear.as_matrix``) and writes back: LoRC a dense ``Q(W) + A B`` (RTN b-bit weight
plus its rank-r error SVD; the model stays dense, the kernel holds the dequantized values);
LoRD, TRP and WeLore's low-rank components the ``lowrank`` form of the Linear (``x A B``),
which ``models.to_hf`` exports as the dense product (the HF formats hold no factors). The
embedding, norms and LM head are left as they are. Every report gives the layers' mean
relative weight error, the logit change on a probe and the parameter count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import convert as C
from jaxattn import heads
from jaxattn.convert.lord import write_lowrank
from jaxattn.layers import Linear, swiglu
from models._convert_base import _check_no_adapters, calibration_batches, logits
from models.decoder import DecoderLM

__all__ = [
    "lorc_model",
    "lord_model",
    "trp_model",
    "welore_model",
    "eora_model",
    "projection_covariances",
]

_NAMES = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")


def _linears(model: DecoderLM, method: str) -> dict[str, Linear]:
    """{"layers/i/attn/q": Linear, ...}: the block projections, each dense with its own kernel."""
    _check_no_adapters(model)
    out = {}
    for path, m in nnx.iter_modules(model):
        name = "/".join(map(str, path))
        if isinstance(m, Linear) and name.startswith("layers/") and name.endswith(_NAMES):
            if m.form is not None or m.kernel is None:
                raise ValueError(f"{method}: {name} has no dense kernel of its own to compress")
            out[name] = m
    if not out:
        raise ValueError(f"{method}: the model has no block projections ({_NAMES}) to compress")
    return out


def _write(lin: Linear, a, b, name: str) -> None:
    """``x A B`` into ``lin``: its lowrank form where k (m + n) < m n, else the dense product."""
    if np.shape(a)[1] <= C.lord_max_rank(*np.shape(a)[:1], np.shape(b)[1]):
        write_lowrank(lin, a, b, path=name)
    else:
        lin.kernel.set_value(jnp.asarray((a @ b).reshape(lin.kernel.shape), lin.kernel.dtype))


def _report(step, model, new, errors, probe_NT) -> dict:
    ref = logits(model, probe_NT).astype(np.float64)
    out = logits(new, probe_NT).astype(np.float64)
    count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(new, nnx.Param)))
    return {
        "step": step,
        "mean_relative_error": float(np.mean(errors)),
        "max_abs_logit_diff": float(np.abs(out - ref).max()),
        "relative_logit_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "parameters": float(count),
    }


def _probe(tokens_NT, batch_size, probe_NT):
    if probe_NT is not None:
        return probe_NT
    t = None if tokens_NT is None else np.asarray(tokens_NT)
    if t is None or t.ndim != 2 or len(t) < 1:
        raise ValueError(f"tokens must be [rows >= 1, T] for the logit probe, got "
                         f"{None if t is None else t.shape}")  # fmt: skip
    return t[:batch_size]


def _run(method, model, tokens_NT, batch_size, probe_NT, per_layer):
    probe = _probe(tokens_NT, batch_size, probe_NT)
    new = nnx.clone(model)
    errors = []
    for name, lin in _linears(new, method).items():
        w = np.asarray(lin.as_matrix(), np.float64)
        try:
            errors.append(per_layer(name, lin, w))
        except ValueError as e:
            raise ValueError(f"{method}: {name} {w.shape}: {e}") from None
    return new, [_report(method, model, new, errors, probe)]


def lorc_model(model, tokens_NT=None, *, bits: int = 4, rank: int = 8, group_size=None,
               batch_size: int = 8, probe_NT=None):  # fmt: skip
    """LoRC: every block projection becomes ``Q(W) + A B`` (RTN ``bits``, rank-``rank`` SVD of
    W − Q(W)), written dense. Returns (model, [report with ``mean_relative_error``])."""

    def one(name, lin, w):
        wq = C.rtn_quantize(w, bits=bits, group_size=group_size)
        a, b, info = C.svd_compensation(w, wq, rank=min(rank, *w.shape))
        lin.kernel.set_value(jnp.asarray((wq + a @ b).reshape(lin.kernel.shape), lin.kernel.dtype))
        return info["relative_error"]

    return _run("lorc", model, tokens_NT, batch_size, probe_NT, one)


def lord_model(model, tokens_NT=None, *, reduction: float = 0.5, batch_size: int = 8,
               probe_NT=None):  # fmt: skip
    """LoRD: every block projection factorised at rank ⌊(1 − reduction) min(m, n)⌋
    (:func:`~jaxattn.convert.lord.lord_linear`; refused where that rank saves nothing)."""
    if isinstance(reduction, str):
        reduction = float(reduction)

    def one(name, lin, w):
        return C.lord_linear(lin, reduction=reduction, path=name)["relative_error"]

    return _run("lord", model, tokens_NT, batch_size, probe_NT, one)


def trp_model(model, tokens_NT=None, *, energy: float = 0.9, batch_size: int = 8,
              probe_NT=None):  # fmt: skip
    """TRP's truncation T(W) on every block projection: rank by the energy share ``energy``;
    factorised where that saves parameters, else written back dense at that rank."""
    if isinstance(energy, str):
        energy = float(energy)

    def one(name, lin, w):
        a, b, info = C.trp_truncate(w, energy=energy)
        _write(lin, a, b, name)
        return info["relative_error"]

    return _run("trp", model, tokens_NT, batch_size, probe_NT, one)


def welore_model(model, tokens_NT=None, *, reduction: float = 0.5, batch_size: int = 8,
                 probe_NT=None):  # fmt: skip
    """WeLore over all block projections at once (one τ, ranks from the σ decay): the LRCs
    factorised, the N-LRCs kept dense."""
    if isinstance(reduction, str):
        reduction = float(reduction)
    probe = _probe(tokens_NT, batch_size, probe_NT)
    new = nnx.clone(model)
    lins = _linears(new, "welore")
    mats = {n: np.asarray(m.as_matrix(), np.float64) for n, m in lins.items()}
    try:
        out, info = C.welore(mats, reduction=reduction)
    except ValueError as e:
        raise ValueError(f"welore: {e}") from None
    for name, got in out.items():
        if isinstance(got, tuple):
            _write(lins[name], got[0], got[1], name)
    errors = [info["errors"].get(n, 0.0) for n in mats]
    report = _report("welore", model, new, errors, probe)
    report["lrc_share"] = sum(isinstance(v, tuple) for v in out.values()) / len(out)
    return new, [report]


# -- EoRA: per-projection input statistics ------------------------------------------------------
def projection_covariances(model: DecoderLM, tokens_NT, *, batch_size: int = 8) -> dict:
    """E[x xᵀ] of every block projection's input, in one compiled pass over the calibration rows.

    q / k / v read ``attn_norm(resid_pre)``, o the per-head outputs ``attn.z`` (flattened
    [N·V], the order of ``o.as_matrix()``), gate / up ``mlp_norm(resid_mid)``, down the SwiGLU
    hidden ``swiglu(gate(n), up(n))``; captured through the ``jaxattn.heads`` hooks.

    Returns:
      {"layers/i/attn/q": cov [I, I] float64, ...} for every name :func:`_linears` lists.
    """
    batches = calibration_batches(tokens_NT, batch_size)
    graphdef, state = nnx.split(model)
    sums = jax.device_get(_covariance_pass(graphdef, state, batches))
    count = float(batches.shape[0] * batches.shape[1] * batches.shape[2])
    out = {}
    for i, (attn_in, z, mlp_in, hidden) in enumerate(sums):
        for names, s in ((("q", "k", "v"), attn_in), (("o",), z)):
            for n in names:
                out[f"layers/{i}/attn/{n}"] = np.asarray(s, np.float64) / count
        for names, s in ((("gate", "up"), mlp_in), (("down",), hidden)):
            for n in names:
                out[f"layers/{i}/mlp/{n}"] = np.asarray(s, np.float64) / count
    return out


@functools.partial(jax.jit, static_argnums=0)
def _covariance_pass(graphdef, state, batches):
    m = nnx.merge(graphdef, state)
    n = len(m.layers)
    names = [f"blocks.{i}.{p}" for i in range(n) for p in ("resid_pre", "attn.z", "resid_mid")]

    def xx(x):
        x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return x.T @ x

    def one(tok_BT):
        _, caps = heads.run_with_hooks(m, tok_BT, [heads.Capture(c) for c in names])
        out = []
        for i, blk in enumerate(m.layers):
            z = caps[f"blocks.{i}.attn.z"]
            h = blk.mlp_norm(caps[f"blocks.{i}.resid_mid"])
            hidden = swiglu(blk.mlp.gate(h), blk.mlp.up(h))
            attn_in = blk.attn_norm(caps[f"blocks.{i}.resid_pre"])
            out.append((xx(attn_in), xx(z.reshape(*z.shape[:2], -1)), xx(h), xx(hidden)))
        return out

    def body(acc, tok_BT):
        return jax.tree.map(jnp.add, acc, one(tok_BT)), None

    total, _ = jax.lax.scan(body, one(batches[0]), batches[1:])
    return total


def eora_model(model, tokens_NT=None, *, bits: int = 4, rank: int = 8, group_size=None,
               batch_size: int = 8, probe_NT=None):  # fmt: skip
    """EoRA on every block projection: ``Q(W) + A B`` with Q RTN at ``bits`` and the rank-r
    compensation fitted in the eigenspace of the projection's calibrated input covariance
    (:func:`~jaxattn.convert.compensation.eora`; LoRC is the same with an identity covariance),
    written dense.

    Returns:
      (model, [report]): ``mean_relative_error`` = mean over projections of
      sqrt(E‖x (W − W')‖²) / sqrt(E‖x W‖²) on the calibration inputs, ``mean_relative_error_lorc``
      the same for LoRC's plain SVD compensation at the same rank, and the logit comparison.
    """
    if tokens_NT is None:
        raise ValueError("eora needs calibration tokens (each projection's input covariance)")
    covs = projection_covariances(model, tokens_NT, batch_size=batch_size)
    lorc_errors = []

    def one(name, lin, w):
        c = covs[name]
        wq = C.rtn_quantize(w, bits=bits, group_size=group_size)
        a, b, info = C.eora(w, wq, c, rank=min(rank, *w.shape))
        lin.kernel.set_value(jnp.asarray((wq + a @ b).reshape(lin.kernel.shape), lin.kernel.dtype))
        ref = float(np.sqrt(max(np.einsum("io,ij,jo->", w, c, w), 1e-300)))
        lorc_errors.append(info["weighted_error_svd"] / ref)
        return info["weighted_error"] / ref

    new, (report,) = _run("eora", model, tokens_NT, batch_size, probe_NT, one)
    report["mean_relative_error_lorc"] = float(np.mean(lorc_errors))
    return new, [report]
