"""Pallas GPU kernels beside cuDNN and tokamax: flash attention TFLOP/s and decode GB/s.

In one run, on one GPU, in bf16:

  flash   ``flash_attention_gpu`` (ours, Mosaic GPU) forward and backward TFLOP/s beside
          ``jax.nn.dot_product_attention(..., implementation="cudnn")`` and tokamax's Mosaic GPU
          flash attention (``tokamax.dot_product_attention(..., implementation="mosaic")``;
          optional: ``pip install -e .[peers]``), with ours/peer ratios and ours' fraction of
          the chip's dense bf16 peak (benchmarks/_devices.py);
  decode  ``decode_attention_gpu`` GB/s beside the same peers (``key_value_seq_lengths``),
          with the fraction of the chip's HBM bandwidth.

Conventions (FlashAttention's benchmarks):
  * forward FLOPs = 2·B·N·(H + V)·pairs, pairs = the visible (query, key) pairs counted
    exactly: T·S without a mask, T(T+1)/2 causal with T = S (a fraction (T+1)/(2T), not 1/2);
  * backward FLOPs = 2.5 × forward (five matmuls against the forward's two);
  * backward time = (forward+backward) time − forward time, both measured (jax.vjp with a
    random output cotangent);
  * shapes as FA3's benchmark: B·T = 16K tokens, N·H = 2048 (N = 32, 16, 8 heads for H = 64,
    128, 256), no GQA, random normal inputs;
  * decode bytes = the live k and v cache read once, B·C·K·(H + V)·2 (every sequence full);
    q and o are negligible and not counted. GQA: T = 1, N = 32, K = 8, H = V = 128.
Timing: each function is jitted and run once (compile, warm-up), then timed as the median of
``--repeats`` runs; a run is a burst of back-to-back calls lasting at least ``--min-run-ms``,
ended by ``jax.block_until_ready`` (this hides the dispatch cost of sub-millisecond kernels).
A peer that raises (shape not supported, missing library) gets "n/a (reason)" and the run goes
on. Rows are run H = 128 first, then decode, then H = 64 and 256; rows not started within
``--time-budget`` seconds (default 360) are listed as skipped, so the full grid ends in about
6 minutes whatever the compile times (not yet measured on a GPU). ``--json`` is rewritten
after every row. benchmarks/gpu_check.sh runs the GPU kernel tests and this script in one go.

  python -m benchmarks.kernels                    # full grid: 22 flash rows, 9 decode points
  python -m benchmarks.kernels --quick            # H=128, T=4K and 16K, one decode point
  python -m benchmarks.kernels --json k.json --markdown k.md
  python -m benchmarks.kernels --interpret        # no GPU: plumbing only, numbers meaningless
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _devices
from benchmarks._timing import import_tokamax, median_seconds
from jaxattn import masks
from pallas_kernels.decode_attention import decode_attention_gpu, unsupported_reason_gpu
from pallas_kernels.flash_attention import flash_attention_gpu

PEERS = ("cudnn", "tokamax")  # timed beside ours when available
BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs: 5 matmuls against 2
FULL_FLASH = {
    128: (1024, 2048, 4096, 8192, 16384),
    64: (1024, 4096, 16384),
    256: (1024, 4096, 16384),
}
QUICK_FLASH = {128: (4096, 16384)}
TINY_FLASH = {64: (128,)}  # --interpret: B=1, N=2
# name: (T, N, K, H, V, shared_kv); shared: the latent cache is both k and v (absorbed MLA)
DECODE_CONFIGS = {
    "gqa_n32_k8_h128": (1, 32, 8, 128, 128, False),
    "mla_n16_k1_h576": (1, 16, 1, 576, 576, True),
}
FULL_DECODE = [("gqa_n32_k8_h128", B, C) for B in (8, 32) for C in (8192, 16384, 32768, 65536)]
FULL_DECODE += [("mla_n16_k1_h576", 8, 32768)]
QUICK_DECODE = [("gqa_n32_k8_h128", 8, 32768)]
TINY_DECODE = {"tiny_n4_k2_h64": (1, 4, 2, 64, 64, False)}  # --interpret: B=1, C=256
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def visible_pairs(T: int, S: int, *, causal: bool, q_offset: int = 0, kv_length=None) -> int:
    """(query, key) pairs of one sequence and head that the mask leaves visible.

    Query row i sits at position i + q_offset and, when causal, sees keys j <= i + q_offset;
    keys j >= kv_length (default S) are masked. Counted exactly, row by row.
    """
    L = S if kv_length is None else max(0, min(int(kv_length), S))
    if not causal:
        return T * L
    per_row = np.arange(T, dtype=np.int64) + q_offset + 1
    return int(np.clip(per_row, 0, L).sum())


def flash_flops(*, B, N, T, S, H, V, causal, q_offset=0, kv_lengths=None) -> float:
    """Forward FLOPs: q·k and p·v cost 2·(H + V) per visible pair and head (backward: × 2.5)."""
    lens = [None] * B if kv_lengths is None else list(kv_lengths)
    pairs = sum(visible_pairs(T, S, causal=causal, q_offset=q_offset, kv_length=L) for L in lens)
    return 2.0 * N * (H + V) * pairs


def _reason(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0].replace("|", "/")
    return f"{type(e).__name__}: {text}"[:100]


def _tokamax():
    """(module, None) or (None, why not)."""
    try:
        return import_tokamax(), None
    except Exception as e:  # ImportError, or a tokamax that fails on this jax
        return None, f"not importable: {_reason(e)}"


def _ours(interpret):
    """Flash and decode makers of our kernels (a flash maker takes ``causal``)."""

    def flash(causal):
        mask = masks.Causal() if causal else None
        return lambda q, k, v: flash_attention_gpu(q, k, v, mask=mask, interpret=interpret)

    def decode(q, k, v, lens):
        return decode_attention_gpu(q, k, v, lens, interpret=interpret)

    return flash, decode


def _sdpa(fn, implementation):
    """Flash and decode makers of a ``jax.nn.dot_product_attention``-like function."""
    flash = lambda causal: functools.partial(fn, is_causal=causal, implementation=implementation)
    decode = lambda q, k, v, lens: fn(
        q, k, v, key_value_seq_lengths=lens, implementation=implementation
    )
    return flash, decode


def implementations(interpret, want=("ours", *PEERS)):
    """({name: (flash maker, decode maker)}, notes saying why a peer is left out)."""
    backend = jax.default_backend()
    impls, notes = {"ours": _ours(interpret)}, []
    if backend != "gpu":
        notes.append(f"cudnn: n/a (needs an NVIDIA GPU; backend is {backend!r})")
    else:
        impls["cudnn"] = _sdpa(jax.nn.dot_product_attention, "cudnn")
    tk, why = _tokamax()
    if tk is None:
        notes.append(f"tokamax: n/a ({why}; pip install -e .[peers])")
    elif backend != "gpu":
        notes.append(
            f"tokamax: n/a (its Mosaic GPU kernel needs an NVIDIA GPU; backend is {backend!r})"
        )
    else:
        impls["tokamax"] = _sdpa(tk.dot_product_attention, "mosaic")
    return {k: v for k, v in impls.items() if k in want}, notes


def _jit(fn, interpret):
    # The interpreter's programs are big and run once: spend no time optimising them.
    return jax.jit(fn, compiler_options=FAST_COMPILE) if interpret else jax.jit(fn)


def flash_row(impls, H, T, mask, cfg) -> dict:
    """Forward and backward time and TFLOP/s of each implementation at one shape.

    Args: ``impls`` from ``implementations``; ``mask`` "causal" or "none"; ``cfg`` the parsed
    flags (tokens, hidden, repeats, min_run_s, interpret). Returns the row's dict.
    """
    causal = mask == "causal"
    B, N = max(1, cfg.tokens // T), max(1, cfg.hidden // H)
    ks = jax.random.split(jax.random.key(T + H), 4)
    # q_BTNH, k_BSNH, v_BSNH and the output cotangent do_BTNH (S = T, no GQA: K = N)
    qkvo = [jax.random.normal(key, (B, T, N, H), jnp.bfloat16) for key in ks]
    fwd_flops = flash_flops(B=B, N=N, T=T, S=T, H=H, V=H, causal=causal)
    row = dict(H=H, T=T, B=B, N=N, mask=mask, fwd_gflop=fwd_flops / 1e9)
    for name, (make, _) in impls.items():
        attn = make(causal)

        def fwd_bwd(q_BTNH, k_BSNH, v_BSNH, do_BTNH, attn=attn):
            o_BTNH, vjp = jax.vjp(attn, q_BTNH, k_BSNH, v_BSNH)
            return o_BTNH, vjp(do_BTNH)

        res = {}
        try:
            t_f = median_seconds(_jit(attn, cfg.interpret), qkvo[:3], cfg.repeats, cfg.min_run_s)
            res.update(fwd_ms=t_f * 1e3, fwd_tflops=fwd_flops / t_f / 1e12)
            t_fb = median_seconds(_jit(fwd_bwd, cfg.interpret), qkvo, cfg.repeats, cfg.min_run_s)
            res.update(fwd_bwd_ms=t_fb * 1e3)
            if t_fb > t_f:  # a difference of two noisy medians: no number when it is not positive
                res.update(bwd_ms=(t_fb - t_f) * 1e3)
                res["bwd_tflops"] = BWD_FACTOR * fwd_flops / (t_fb - t_f) / 1e12
            else:
                res["bwd_error"] = "fwd+bwd time <= fwd time (noise)"
        except Exception as e:  # one implementation's failure must not end the run
            res["bwd_error" if "fwd_ms" in res else "error"] = _reason(e)
        row[name] = res
    return row


def decode_row(impls, name, B, C, cfg) -> dict:
    """Time and GB/s (live cache bytes / time) of each implementation at one cache shape."""
    T, N, K, H, V, shared = cfg.decode_configs[name]
    live_bytes = B * C * K * (H + (0 if shared else V)) * 2  # bf16
    row = dict(config=name, B=B, C=C, T=T, N=N, K=K, H=H, V=V, gbytes=live_bytes / 1e9)
    sds = jax.ShapeDtypeStruct
    shapes = [sds((B, T, N, H), jnp.bfloat16), sds((B, C, K, H), jnp.bfloat16)]
    reason = unsupported_reason_gpu(*shapes, sds((B, C, K, V), jnp.bfloat16), sds((B,), jnp.int32))
    if reason is not None:  # ours cannot: no ratio to take, spend no time on the peers
        return dict(row, ours={"error": reason}, skipped="peers not timed: ours n/a")
    ks = jax.random.split(jax.random.key(C + B), 3)
    q_BTNH = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
    k_BCKH = jax.random.normal(ks[1], (B, C, K, H), jnp.bfloat16)
    v_BCKV = k_BCKH if shared else jax.random.normal(ks[2], (B, C, K, V), jnp.bfloat16)
    args = (q_BTNH, k_BCKH, v_BCKV, jnp.full((B,), C, jnp.int32))  # every sequence full
    for impl, (_, make) in impls.items():
        try:
            t = median_seconds(_jit(make, cfg.interpret), args, cfg.repeats, cfg.min_run_s)
            row[impl] = dict(us=t * 1e6, gbps=live_bytes / t / 1e9)
        except Exception as e:  # one implementation's failure must not end the run
            row[impl] = {"error": _reason(e)}
    return row


def measured_ceilings(cfg) -> dict:
    """This chip's bf16 matmul TFLOP/s (8192³, random data) and copy GB/s (read + write)."""
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    t_mm = median_seconds(jax.jit(jnp.matmul), (a, a), cfg.repeats, cfg.min_run_s)
    x = jax.random.normal(jax.random.key(1), (2**30,), jnp.bfloat16)
    t_cp = median_seconds(jax.jit(lambda x: x * 2), (x,), cfg.repeats, cfg.min_run_s)
    return dict(matmul_tflops=2 * 8192**3 / t_mm / 1e12, copy_gbps=2 * x.nbytes / t_cp / 1e9)


# ------------------------------------------------------------------------------ output


def _num(res, key, fmt, why=True):
    """A cell: the number, or n/a with (``why``) the reason the implementation gave."""
    if res is None or (key not in res and not why):
        return "n/a"
    if key in res:
        return format(res[key], fmt)
    return f"n/a ({res.get('error') or res.get('bwd_error') or 'not measured'})"


def _brief(row, impls) -> str:
    """One progress line: each implementation's figures or its error."""
    parts = []
    for name in impls:
        res = row.get(name, {})
        keys = [k for k in ("fwd_tflops", "bwd_tflops", "gbps") if k in res]
        nums = [f"{k.split('_')[0]} {res[k]:.1f}" for k in keys]
        errs = [f"n/a ({res[k]})" for k in ("error", "bwd_error") if k in res]
        parts.append(f"{name} " + " ".join(nums + errs))
    return " | ".join(parts)


def _ratio(a, b, key):
    if a and b and key in a and key in b:
        return f"{a[key] / b[key]:.2f}x"
    return "-"


def _pct(res, key, ceiling):
    return f"{100 * res[key] / ceiling:.1f}" if res and key in res and ceiling else "?"


def _table(cols, rows):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def flash_table(rows, peers, peak) -> list[str]:
    """One line per (H, T, mask, pass); TFLOP/s, ours/peer (= peer time / ours), % of peak."""
    cols = ["H", "T", "B×N", "mask", "pass", "ours ms", "ours TFLOP/s"]
    cols += [f"{p} TFLOP/s" for p in peers] + [f"ours/{p}" for p in peers] + ["ours % peak"]
    lines = []
    for r in rows:
        for pas in ("fwd", "bwd"):
            key, ours = f"{pas}_tflops", r.get("ours")
            cells = [r["H"], r["T"], f"{r['B']}×{r['N']}", r["mask"], pas]
            cells += [_num(ours, f"{pas}_ms", ".3f", why=False), _num(ours, key, ".1f")]
            cells += [_num(r.get(p), key, ".1f") for p in peers]
            cells += [_ratio(ours, r.get(p), key) for p in peers] + [_pct(ours, key, peak)]
            lines.append(cells)
    return _table(cols, lines)


def decode_table(rows, peers, hbm) -> list[str]:
    """One line per (config, B, C); GB/s of live cache read, ours/peer, % of HBM bandwidth."""
    cols = ["config", "B", "C", "GB read", "ours µs", "ours GB/s"]
    cols += [f"{p} GB/s" for p in peers] + [f"ours/{p}" for p in peers] + ["ours % HBM"]
    lines = []
    for r in rows:
        ours = r.get("ours")
        cells = [r["config"], r["B"], r["C"], f"{r['gbytes']:.2f}"]
        cells += [_num(ours, "us", ".1f", why=False), _num(ours, "gbps", ".0f")]
        cells += [_num(r.get(p), "gbps", ".0f") if "skipped" not in r else "-" for p in peers]
        cells += [_ratio(ours, r.get(p), "gbps") for p in peers] + [_pct(ours, "gbps", hbm)]
        lines.append(cells)
    return _table(cols, lines)


def targets(flash_rows, decode_rows, hbm) -> list[str]:
    """Issue 3's targets, read off this run's rows."""
    lines = []
    row = next(
        (r for r in flash_rows if (r["H"], r["T"], r["mask"]) == (128, 16384, "causal")), None
    )
    if row:
        ours, cudnn = row.get("ours", {}), row.get("cudnn")
        lines.append(
            "- target H=128 T=16K causal: ours fwd "
            f"{_num(ours, 'fwd_tflops', '.0f')} TFLOP/s (>= 600), bwd "
            f"{_num(ours, 'bwd_tflops', '.0f')} (>= 450); vs cuDNN fwd "
            f"{_ratio(ours, cudnn, 'fwd_tflops')}, bwd "
            f"{_ratio(ours, cudnn, 'bwd_tflops')} (>= 1.0x)"
        )
    gbps = [r["ours"]["gbps"] for r in decode_rows if "gbps" in r.get("ours", {})]
    if gbps and hbm:
        lines.append(
            f"- target decode >= 80% of HBM ({hbm:.0f} GB/s): ours "
            f"{100 * min(gbps) / hbm:.0f}%..{100 * max(gbps) / hbm:.0f}% over {len(gbps)} points"
        )
    return lines


def header() -> list[str]:
    """The report's first lines: device kind, versions (jax, jaxlib, tokamax, cuDNN where
    known) and the datasheet ceilings."""
    dev = jax.devices()[0]
    versions = [f"jax {jax.__version__}"]
    try:
        from importlib.metadata import version

        versions.append(f"jaxlib {version('jaxlib')}")
        versions.append(f"tokamax {version('tokamax')}")
    except Exception:  # not installed
        pass
    try:
        from jax._src.lib import cuda_versions  # private; absent or None without CUDA

        versions.append(f"cuDNN {cuda_versions.cudnn_get_version()}")
    except Exception:
        pass
    chip = _devices.chip(dev.device_kind)
    lines = [f"Device: {dev.device_kind} ({dev.platform}), {', '.join(versions)}."]
    if chip:
        lines.append(
            f"- datasheet: dense bf16 {chip.bf16_tflops} TFLOP/s, HBM {chip.hbm_gbps} GB/s"
        )
    return lines


# ------------------------------------------------------------------------------ main


def _grids(args):
    """(flash {H: lengths}, decode [(config, B, C)], decode configs) for the mode and flags."""
    if args.interpret:
        flash, decode, configs = TINY_FLASH, [("tiny_n4_k2_h64", 1, 256)], TINY_DECODE
    elif args.quick:
        flash, decode, configs = QUICK_FLASH, QUICK_DECODE, DECODE_CONFIGS
    else:
        flash, decode, configs = FULL_FLASH, FULL_DECODE, DECODE_CONFIGS
    if args.head_dims:
        flash = {H: flash.get(H, FULL_FLASH[128]) for H in args.head_dims}
    if args.lengths:
        flash = {H: tuple(args.lengths) for H in flash}
    if args.decode_batches or args.decode_caches:
        names = dict.fromkeys(name for name, _, _ in decode)
        batches = args.decode_batches or sorted({b for _, b, _ in decode})
        caches = args.decode_caches or sorted({c for _, _, c in decode})
        decode = [(n, b, c) for n in names for b in batches for c in caches]
    return flash, decode, configs


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="H=128, T=4K/16K, one decode point")
    p.add_argument("--interpret", action="store_true", help="tiny grid in the GPU interpreter")
    p.add_argument("--head-dims", type=int, nargs="+", help="H values (default: the grid's)")
    p.add_argument("--lengths", type=int, nargs="+", help="T values for every H")
    p.add_argument("--masks", nargs="+", default=["causal", "none"], choices=["causal", "none"])
    p.add_argument("--decode-batches", type=int, nargs="+")
    p.add_argument("--decode-caches", type=int, nargs="+")
    p.add_argument("--parts", nargs="+", default=["flash", "decode"], choices=["flash", "decode"])
    p.add_argument("--impls", nargs="+", default=["ours", *PEERS], choices=["ours", *PEERS])
    p.add_argument("--tokens", type=int, default=16384, help="B·T of the flash rows")
    p.add_argument("--hidden", type=int, default=2048, help="N·H of the flash rows")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-run-ms", type=float, default=20.0, help="shortest timed burst")
    p.add_argument("--time-budget", type=float, default=360.0, help="s; 0: no limit")
    p.add_argument("--no-ceilings", action="store_true", help="skip the matmul/copy probe")
    p.add_argument("--json", help="write the results here (rewritten after each row)")
    p.add_argument("--markdown", help="write the printed tables here too")
    return p


def _notes(args, impl_notes) -> list[str]:
    """Markdown bullets: why peers are missing, the conventions, the measured ceilings."""
    notes = list(impl_notes) + [
        f"flash: bf16, B·T = {args.tokens}, N·H = {args.hidden}, K = N; fwd FLOPs = "
        "2·B·N·(H+V)·visible pairs (causal counted exactly), bwd FLOPs = 2.5 × fwd, "
        "bwd time = (fwd+bwd) − fwd; ours/peer = peer time / ours time",
        "decode: bf16, T = 1, every sequence full (kv_lengths = C), bytes = live k + v cache",
        f"time: median of {args.repeats} bursts of calls, each >= {args.min_run_ms:g} ms",
    ]
    if args.interpret:
        notes.append(
            "--interpret: the kernels ran in the Mosaic GPU interpreter on CPU; the numbers "
            "are meaningless, this only checks the script's plumbing"
        )
    elif not args.no_ceilings:
        try:
            m = args.measured = measured_ceilings(args)
            notes.append(
                f"measured here: bf16 matmul 8192³ {m['matmul_tflops']:.0f} TFLOP/s, "
                f"copy {m['copy_gbps']:.0f} GB/s (read + write)"
            )
        except Exception as e:
            notes.append(f"measured ceilings: n/a ({_reason(e)})")
    return [f"- {n}" for n in notes]


def _jobs(args, flash_grid, decode_jobs) -> list[tuple]:
    """The first H's flash rows, then decode, then the other H: a budget cut spares the most."""
    hs = list(flash_grid) if "flash" in args.parts else []
    flash = [("flash", H, T, m) for H in hs for T in flash_grid[H] for m in args.masks]
    first = [j for j in flash if j[1] == hs[0]]
    decode = [("decode", *j) for j in decode_jobs] if "decode" in args.parts else []
    return first + decode + [j for j in flash if j[1] != hs[0]]


def _run(jobs, impls, args, result) -> None:
    """Runs the jobs into ``result`` within the time budget, rewriting --json after each."""
    start = time.monotonic()
    for job in jobs:
        elapsed = time.monotonic() - start
        if args.time_budget and elapsed > args.time_budget:
            result["skipped"].append(" ".join(map(str, job)))
            continue
        if job[0] == "flash":
            row = flash_row(impls, *job[1:], args)
        else:
            row = decode_row(impls, *job[1:], args)
        result[job[0]].append(row)
        line = f"# [{elapsed:4.0f} s] {' '.join(map(str, job))}: {_brief(row, impls)}"
        print(line, file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    result["seconds"] = time.monotonic() - start


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    report = header()
    backend = jax.default_backend()
    if backend != "gpu" and not args.interpret:
        print("\n".join(report))
        print(
            f"- the Mosaic GPU kernels need a CUDA device (backend is {backend!r}): nothing "
            "timed. --interpret runs a tiny grid in the GPU interpreter to check the plumbing."
        )
        return 0
    if args.interpret:
        args.tokens, args.hidden, args.repeats, args.min_run_ms = 128, 128, 1, 0.0
    args.min_run_s, args.measured = args.min_run_ms / 1e3, {}
    flash_grid, decode_jobs, args.decode_configs = _grids(args)
    impls, impl_notes = implementations(args.interpret, args.impls)
    report += _notes(args, impl_notes) + [
        f"- command: `python -m benchmarks.kernels {' '.join(argv)}`"
    ]
    print("\n".join(report), flush=True)
    kind = jax.devices()[0].device_kind
    peak, hbm = _devices.bf16_tflops(kind), _devices.hbm_gbps(kind)
    result = dict(
        device_kind=kind, platform=backend, jax=jax.__version__, report=report,
        peak_bf16_tflops=peak, hbm_gbps=hbm, measured=args.measured, argv=argv,
        flash=[], decode=[], skipped=[],
    )  # fmt: skip
    _run(_jobs(args, flash_grid, decode_jobs), impls, args, result)

    peers = [p for p in PEERS if p in args.impls]
    tables = []
    if result["flash"]:
        tables += ["", *flash_table(result["flash"], peers, peak)]
    if result["decode"]:
        tables += ["", *decode_table(result["decode"], peers, hbm)]
    tables += ["", *targets(result["flash"], result["decode"], hbm)]
    if result["skipped"]:
        tables.append(f"- skipped, past --time-budget {args.time_budget:g} s: {result['skipped']}")
    tables.append(f"- timed in {result['seconds']:.0f} s")
    print("\n".join(tables), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(report + tables) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
