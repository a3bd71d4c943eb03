"""Attention implementations side by side: time and compiled temporary memory.

For each sequence length and mask, measures forward and forward+backward wall time (median of
``--repeats`` runs after one warm-up) and the compiled program's temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``) of:

  jaxattn "xla", jaxattn "chunked", jax.nn.dot_product_attention, tokamax "xla_chunked"
  (tokamax is an optional peer: ``pip install tokamax``)

all in one run, and prints ratios against jax.nn and tokamax. Configurations whose scores
would not fit ``--max-scores-gib`` are skipped for the implementations that materialise them.

  python -m benchmarks.attention                       # T = 1K..16K, causal and window
  python -m benchmarks.attention --lengths 4096 --masks causal --dtype float32
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks._timing import import_tokamax, median_seconds
from jaxattn import dot_product_attention, masks

MATERIALISING = {"xla", "jax.nn", "tokamax"}  # tokamax xla_chunked still stores T×S probs


def _peers():
    impls = {
        "xla": lambda q, k, v, m: dot_product_attention(q, k, v, mask=m[0], implementation="xla"),
        "chunked": lambda q, k, v, m: dot_product_attention(
            q, k, v, mask=m[0], implementation="chunked"
        ),
        "jax.nn": lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, **m[1]),
    }
    try:
        tokamax = import_tokamax()
        impls["tokamax"] = lambda q, k, v, m: tokamax.dot_product_attention(
            q, k, v, implementation="xla_chunked", **m[1]
        )
    except ImportError:
        print("# tokamax not installed: its column is skipped (pip install tokamax)")
    return impls


def _mask(name: str, window: int):
    if name == "causal":
        return masks.Causal(), dict(is_causal=True)
    if name == "window":
        return masks.SlidingWindow(left=window - 1), dict(local_window_size=(window - 1, 0))
    raise ValueError(f"unknown mask {name!r}")


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _measure(impl, q, k, v, m, repeats, clock):
    fwd = jax.jit(lambda q, k, v: impl(q, k, v, m))
    loss = lambda q, k, v: jnp.sum(impl(q, k, v, m).astype(jnp.float32) ** 2)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    out = {}
    for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        compiled = fn.lower(q, k, v).compile()
        mem = compiled.memory_analysis()
        out[name + "_mem"] = getattr(mem, "temp_size_in_bytes", float("nan"))
        out[name] = median_seconds(compiled, (q, k, v), repeats, clock=CLOCKS[clock])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--masks", nargs="+", default=["causal", "window"])
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine)",
    )
    p.add_argument("--max-scores-gib", type=float, default=4.0)
    p.add_argument("--impls", nargs="+", default=None, help="subset of xla chunked jax.nn tokamax")
    args = p.parse_args(argv)

    impls = _peers()
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    dev = jax.devices()[0]
    print(
        f"# device: {dev.platform} {dev.device_kind}, {jax.device_count()} device(s), "
        f"jax {jax.__version__}, dtype {args.dtype}"
    )
    print(
        f"# B={args.batch} N={args.heads} K={args.kv_heads} H={args.head_dim}; "
        f"median of {args.repeats}; memory = compiled temp bytes"
    )
    cols = list(impls)
    print(
        "| T | mask | pass | "
        + " | ".join(f"{c} s" for c in cols)
        + " | "
        + " | ".join(f"{c} MiB" for c in cols)
        + " | chunked vs jax.nn | chunked vs tokamax |"
    )
    print("|" + "---|" * (3 + 2 * len(cols) + 2))
    dtype = jnp.dtype(args.dtype)
    for T in args.lengths:
        kq, kk, kv = jax.random.split(jax.random.key(T), 3)
        B, N, K, H = args.batch, args.heads, args.kv_heads, args.head_dim
        q = jax.random.normal(kq, (B, T, N, H), dtype)
        k = jax.random.normal(kk, (B, T, K, H), dtype)
        v = jax.random.normal(kv, (B, T, K, H), dtype)
        scores_gib = B * N * T * T * 4 / 2**30
        for mname in args.masks:
            m = _mask(mname, args.window)
            res = {}
            for name, impl in impls.items():
                if name in MATERIALISING and scores_gib > args.max_scores_gib:
                    continue
                res[name] = _measure(impl, q, k, v, m, args.repeats, args.clock)
            for pas in ("fwd", "fwd+bwd"):
                t = [res[c][pas] if c in res else None for c in cols]
                mem = [res[c][pas + "_mem"] / 2**20 if c in res else None for c in cols]
                ratio = lambda peer: (
                    f"{res[peer][pas] / res['chunked'][pas]:.2f}x"
                    if peer in res and "chunked" in res
                    else "-"
                )
                fmt = lambda x, f: "skip" if x is None else format(x, f)
                print(
                    f"| {T} | {mname} | {pas} | "
                    + " | ".join(fmt(x, ".3f") for x in t)
                    + " | "
                    + " | ".join(fmt(x, ".0f") for x in mem)
                    + f" | {ratio('jax.nn')} | {ratio('tokamax')} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
