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

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import convert as C
from jaxattn.convert.lord import write_lowrank
from jaxattn.layers import Linear
from models._convert_base import _check_no_adapters
from models.decoder import DecoderLM

__all__ = ["lorc_model", "lord_model", "trp_model", "welore_model"]

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
    probe = jnp.asarray(np.asarray(probe_NT))
    ref = np.asarray(model(probe), np.float64)
    out = np.asarray(new(probe), np.float64)
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
