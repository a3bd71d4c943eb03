"""Whole-model conversions: TransMLA, KV-head compression, SliceGPT, a registry and a CLI.

``jaxattn.convert`` holds the per-layer steps (pure functions on a layer's arrays); this module
reads a ``DecoderLM``'s layers (``layer_params``: adapters folded in), gathers calibration
statistics in one compiled pass per step and rebuilds the model with the new layer configs as
per-layer specs (that machinery: ``models._convert_base``). Methods are registered by name
(:func:`register_method`), so the CLI and :func:`convert` reach every one the same way:

    python -m models.convert --from HF_DIR --to OUT_DIR --method transmla \\
        --set kv_lora_rank=32 --set rope_dim=16

prints a before/after table (parameters, cache bytes per token, perplexity on the built-in
corpus, time) and writes the result as a Hugging Face checkpoint (``models.to_hf``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import numpy as np
from flax import nnx

from jaxattn import convert as C
from jaxattn.convert.transmla import gqa_unsupported
from jaxattn.layers import MLAConfig
from models._convert_base import (
    _mla_model_config,
    _moments,
    _norm_stats,
    calibrate,
    logits,
    perplexity,
    rebuild,
    with_layers,
)
from models._convert_modegpt import modegpt
from models._convert_slicegpt import normed_covariance, slicegpt
from models._convert_weights import (
    eora_model,
    lorc_model,
    lord_model,
    projection_covariances,
    trp_model,
    welore_model,
)
from models.decoder import DecoderLM

__all__ = [
    "calibrate",
    "rebuild",
    "with_layers",
    "transmla",
    "kv_heads",
    "slicegpt",
    "modegpt",
    "normed_covariance",
    "perplexity",
    "logits",
    "projection_covariances",
    "Method",
    "register_method",
    "registered_methods",
    "convert",
    "main",
]


# -- TransMLA -----------------------------------------------------------------------------------
TRANSMLA_STEPS = ("exact", "rope", "compress", "norm")


def _check_transmla(model, tokens_NT, steps, rope_dim, freqfold, kv_lora_rank, batch_size):
    bad = [s for s in steps if s not in TRANSMLA_STEPS]
    if (
        bad
        or not steps
        or steps[0] != "exact"
        or list(steps) != sorted(steps, key=TRANSMLA_STEPS.index)
    ):
        raise ValueError(
            f"steps={steps} must be an ordered subset of {TRANSMLA_STEPS} from 'exact'"
        )
    c = model.config
    why = {}
    for i in range(c.num_layers):
        reasons = gqa_unsupported(c.layer_attention_config(i))
        if reasons:
            why[i] = reasons
    if why:
        raise ValueError(f"TransMLA cannot convert {c.arch!r} model layers: {why}")
    if "rope" in steps:  # decouple_rope's option checks, before any work
        h = c.layer_attention_config(0).h
        p = h if rope_dim is None else rope_dim
        collapse = h // p if isinstance(p, int) and p > 0 and p % 2 == 0 and h % p == 0 else None
        if collapse is None:
            raise ValueError(f"rope_dim={rope_dim} must be even and divide the head dim {h}")
        ff = collapse if freqfold in (None, "auto") else freqfold
        if not isinstance(ff, int) or ff <= 0 or ff % collapse or (h // 2) % ff:
            raise ValueError(
                f"freqfold={freqfold} must be a multiple of collapse={collapse} and divide "
                f"head_dim / 2 = {h // 2}"
            )
    if "compress" in steps and kv_lora_rank is None:
        raise ValueError("step 'compress' needs kv_lora_rank")
    calibrated = [s for s in steps if s != "exact"]
    if calibrated and tokens_NT is None:
        raise ValueError(f"steps {calibrated} need calibration tokens")
    if "compress" in steps:
        a = c.layer_attention_config(0)
        p = a.h if rope_dim is None else rope_dim
        top = a.n_kv * (a.h + a.v) - (p if "rope" in steps else 0)
        if not isinstance(kv_lora_rank, int) or not 1 <= kv_lora_rank <= top:
            raise ValueError(
                f"kv_lora_rank={kv_lora_rank} must be an int in [1, {top}] (the GQA-equivalent "
                f"latent: K·(H+V) - rope_dim = {a.n_kv}·({a.h}+{a.v}) - {p})"
            )
    if tokens_NT is not None:
        t = np.asarray(tokens_NT)
        used = (t.shape[0] // batch_size) * batch_size * (t.shape[1] if t.ndim == 2 else 0)
        if t.ndim != 2 or used == 0:
            raise ValueError(
                f"calibration tokens must be [rows >= batch_size={batch_size}, T], got {t.shape}"
            )
        if "compress" in steps and used < kv_lora_rank:
            raise ValueError(
                f"calibration has {used} tokens, fewer than kv_lora_rank={kv_lora_rank}"
            )


def transmla(
    model: DecoderLM,
    tokens_NT=None,
    *,
    steps=TRANSMLA_STEPS,
    rope_dim: int | None = None,
    freqfold: int | None = None,
    kv_lora_rank: int | None = None,
    balance_kv: bool = True,
    batch_size: int = 8,
    probe_NT=None,
) -> tuple[DecoderLM, list[dict]]:
    """TransMLA on every layer of a Llama / Qwen2 / Mistral DecoderLM (``jaxattn.convert``).

    Args:
      model: the GQA model (e.g. from ``models.from_hf``).
      tokens_NT: calibration tokens [N, T] (needed by every step after "exact").
      steps: an ordered subset of ("exact", "rope", "compress", "norm"); "compress" is
        skipped when ``kv_lora_rank`` is None.
      rope_dim, freqfold: :func:`jaxattn.convert.decouple_rope`'s options; ``freqfold="auto"``
        searches collapse, 2·collapse, ... while the calibration NLL (first batch) falls, as
        the paper's converter does.
      kv_lora_rank, balance_kv: :func:`jaxattn.convert.compress_latent`'s options.
      batch_size: calibration rows per step.
      probe_NT: tokens on which each step's logits are compared with the original's (default
        the first batch of ``tokens_NT``, or none).

    Returns:
      (the MLA model, one report per step: ``step``, ``max_abs_logit_diff`` vs the original on
      the probe, ``cache_bytes_per_token``, and the layers' mean of each step info number).
    """
    steps = tuple(s for s in steps if s != "compress" or kv_lora_rank is not None)
    _check_transmla(model, tokens_NT, steps, rope_dim, freqfold, kv_lora_rank, batch_size)
    if probe_NT is None and tokens_NT is not None:
        probe_NT = np.asarray(tokens_NT)[:batch_size]
    ref = None if probe_NT is None else logits(model, probe_NT)
    configs, params = [], []
    for blk in model.layers:
        cfg, p, _ = C.gqa_to_mla(blk.attn.config, C.layer_params(blk.attn))
        configs.append(cfg)
        params.append(p)
    current = rebuild(model, _mla_model_config(model.config, configs), params)
    reports = [_report(current, "exact", [{"exact": 1.0}], probe_NT, ref)]
    tokens_NT = None if tokens_NT is None else np.asarray(tokens_NT)
    for step in steps[1:]:
        if step == "norm":
            stats = _norm_stats(current, tokens_NT, batch_size)
        else:
            stats = _moments(current, tokens_NT, batch_size)
        layers = [
            (blk.attn.config, C.layer_params(blk.attn), stats[i])
            for i, blk in enumerate(current.layers)
        ]

        def run(fn, **kw):
            outs = [fn(*args, **kw) for args in layers]
            new_cfg = _mla_model_config(model.config, [o[0] for o in outs])
            return rebuild(current, new_cfg, [o[1] for o in outs]), outs

        if step == "rope" and freqfold == "auto":
            current, outs = _best_freqfold(run, rope_dim, tokens_NT[:batch_size], configs[0])
        elif step == "rope":
            current, outs = run(C.decouple_rope, rope_dim=rope_dim, freqfold=freqfold)
        elif step == "compress":
            current, outs = run(C.compress_latent, kv_lora_rank=kv_lora_rank, balance_kv=balance_kv)
        else:
            current, outs = run(C.fit_latent_norm)
        configs, params = [o[0] for o in outs], [o[1] for o in outs]
        reports.append(_report(current, step, [o[2] for o in outs], probe_NT, ref))
    return current, reports


def _nll(model, tokens_NT) -> float:
    """Mean next-token NLL of ``model`` within the rows of ``tokens_NT``."""
    x = np.asarray(tokens_NT)
    z = logits(model, x[:, :-1]).astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, x[:, 1:, None], axis=-1).mean())


def _best_freqfold(run, rope_dim, tokens_NT, exact: MLAConfig):
    """TransMLA's freqfold search: collapse, 2·collapse, ... while the calibration NLL falls."""
    h = exact.rope_block_dim
    ff = h // (h if rope_dim is None else rope_dim)
    best, best_nll = None, float("inf")
    while ff <= h // 2 and (h // 2) % ff == 0:
        model, outs = run(C.decouple_rope, rope_dim=rope_dim, freqfold=ff)
        nll = _nll(model, tokens_NT)
        if nll >= best_nll:
            break
        best, best_nll, ff = (model, outs), nll, ff * 2
    return best


def _report(model, step, infos, probe_NT, ref) -> dict:
    out = {"step": step, "cache_bytes_per_token": model.cache_bytes_per_token()}
    for key in infos[0]:
        out[key] = float(np.mean([info[key] for info in infos]))
    if ref is not None:
        out["max_abs_logit_diff"] = float(np.abs(logits(model, probe_NT) - ref).max())
    return out


# -- KV-head compression -----------------------------------------------------------------------
def kv_heads(
    model: DecoderLM, tokens_NT, *, num_kv_heads: int, batch_size: int = 8, probe_NT=None
) -> tuple[DecoderLM, list[dict]]:
    """MHA -> GQA by PCA-merged kv heads (``jaxattn.convert.merge_kv_heads``), every layer.

    Args:
      model: a DecoderLM whose layers are all "mha" (Llama / Qwen2 / Mistral).
      tokens_NT: calibration tokens [N, T].
      num_kv_heads: K' (dividing every layer's kv heads).
      batch_size: calibration rows per step.
      probe_NT: tokens for the logit comparison (default the first calibration batch).

    Returns:
      (the GQA model, [report]: the layers' mean errors, cache bytes, ``max_abs_logit_diff``).
    """
    c = model.config
    kinds = {i: c.layer_kind(i) for i in range(c.num_layers) if c.layer_kind(i) != "mha"}
    if kinds:
        raise ValueError(f"kv_heads merges 'mha' layers only; layers {kinds} are not")
    _check_transmla_tokens(tokens_NT, batch_size)
    stats = _moments(model, tokens_NT, batch_size)
    configs, params, infos = [], [], []
    for i, blk in enumerate(model.layers):
        cfg, p, info = C.merge_kv_heads(
            blk.attn.config, C.layer_params(blk.attn), stats[i], num_kv_heads=num_kv_heads
        )
        configs.append(cfg)
        params.append(p)
        infos.append(info)
    new = rebuild(model, with_layers(c.replace(num_kv_heads=num_kv_heads), configs), params)
    probe_NT = np.asarray(tokens_NT)[:batch_size] if probe_NT is None else probe_NT
    ref = logits(model, probe_NT)
    return new, [_report(new, "kv_heads", infos, probe_NT, ref)]


def _check_transmla_tokens(tokens_NT, batch_size):
    t = None if tokens_NT is None else np.asarray(tokens_NT)
    if t is None or t.ndim != 2 or t.shape[0] < batch_size:
        shape = None if t is None else t.shape
        raise ValueError(
            f"calibration tokens must be [rows >= batch_size={batch_size}, T], got {shape}"
        )


# -- registry -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    """A named model conversion: ``fn(model, tokens_NT, **options) -> (model, reports)``.

    Attributes:
      name: the name ``--method`` takes.
      fn: the conversion.
      options: the keyword options ``fn`` accepts (``--set`` is checked against them).
    """

    name: str
    fn: Callable
    options: tuple[str, ...]


_METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` available to :func:`convert` and the CLI by its name."""
    if method.name in _METHODS and not replace:
        raise ValueError(f"conversion method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def registered_methods() -> tuple[str, ...]:
    """The registered method names."""
    return tuple(sorted(_METHODS))


register_method(Method("kv_heads", kv_heads, ("num_kv_heads", "batch_size")))
register_method(Method("slicegpt", slicegpt, ("dim", "batch_size")))
register_method(Method("lorc", lorc_model, ("bits", "rank", "group_size", "batch_size")))
register_method(Method("lord", lord_model, ("reduction", "batch_size")))
register_method(Method("trp", trp_model, ("energy", "batch_size")))
register_method(Method("welore", welore_model, ("reduction", "batch_size")))
register_method(Method("eora", eora_model, ("bits", "rank", "group_size", "batch_size")))
register_method(Method("modegpt", modegpt, ("keep", "types", "ridge", "batch_size")))
register_method(
    Method(
        "transmla",
        transmla,
        ("steps", "rope_dim", "freqfold", "kv_lora_rank", "balance_kv", "batch_size"),
    )
)


def convert(model: DecoderLM, method: str, tokens_NT=None, **options):
    """Run the registered ``method`` on ``model`` -> (new model, per-step reports).

    Raises:
      ValueError: an unknown method or option (the valid ones listed).
    """
    if method not in _METHODS:
        raise ValueError(
            f"unknown conversion method {method!r}; registered: {registered_methods()}"
        )
    m = _METHODS[method]
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        raise ValueError(f"method {method!r} has no options {unknown}; options: {list(m.options)}")
    return m.fn(model, tokens_NT, **options)


# -- CLI ----------------------------------------------------------------------------------------
def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        if text.lower() in ("true", "false"):
            out[key] = text.lower() == "true"
        elif "," in text:
            out[key] = tuple(t for t in text.split(",") if t)
        else:
            try:
                out[key] = int(text)
            except ValueError:
                out[key] = text
    return out


def _count(model) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def main(argv=None) -> None:
    """``python -m models.convert --from DIR --to DIR --method NAME [--set key=value ...]``."""
    ap = argparse.ArgumentParser(
        prog="python -m models.convert", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--from", dest="src", required=True, help="Hugging Face model directory")
    ap.add_argument("--to", dest="dst", required=True, help="output Hugging Face directory")
    ap.add_argument("--method", required=True, help=f"one of {registered_methods()}")
    ap.add_argument("--set", action="append", default=[], help="method option key=value")
    ap.add_argument("--data", default="builtin", help="calibration / eval tokens (train.data)")
    ap.add_argument("--calib-rows", type=int, default=64, help="calibration rows of --seq-len")
    ap.add_argument("--eval-rows", type=int, default=32, help="eval windows of --seq-len")
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args(argv)
    from models.hf import from_hf, to_hf

    # the token sources live in train.data (the CLI's only use of train; the API takes arrays)
    from train.data import load_tokens

    try:
        options = _parse_set(args.set)
        if args.method not in _METHODS:
            raise ValueError(f"unknown method {args.method!r}; registered: {registered_methods()}")
        model = from_hf(args.src)
        tokens = np.asarray(load_tokens(args.data)) % model.config.vocab_size
        t = args.seq_len
        need = (args.calib_rows + args.eval_rows) * t + 1
        if len(tokens) < need:
            raise ValueError(f"--data has {len(tokens)} tokens, fewer than the {need} asked for")
        calib = tokens[: args.calib_rows * t].reshape(args.calib_rows, t)
        held = tokens[args.calib_rows * t : need]
        before = (_count(model), model.cache_bytes_per_token(), perplexity(model, held, seq_len=t))
        start = time.perf_counter()
        new, reports = convert(model, args.method, calib, **options)
        seconds = time.perf_counter() - start
        after = (_count(new), new.cache_bytes_per_token(), perplexity(new, held, seq_len=t))
        to_hf(new, args.dst)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{'':26}{'before':>14}{'after':>14}")
    for name, b, a in zip(("parameters", "cache bytes / token", "eval perplexity"), before, after):
        fmt = "{:>14.4f}" if isinstance(b, float) else "{:>14d}"
        print(f"{name:26}" + fmt.format(b) + fmt.format(a))
    print(f"{'time (s)':26}{'':>14}{seconds:>14.2f}")
    for r in reports:
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in r.items() if k != "step")
        print(f"step {r['step']}: {numbers}")
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
