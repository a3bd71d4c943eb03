"""Linear attention against softmax attention: training time and memory vs T, decode vs context.

Table 1, for each T: forward+backward wall time (median of ``--repeats`` after a warm-up) and
the compiled program's temporary memory (``memory_analysis().temp_size_in_bytes``) of
``jaxattn.ops.linear_attention`` (chunked form, ``--variants``) and of
``jaxattn.dot_product_attention(mask=Causal(), implementation="chunked")``, in one run, with
the ratio softmax time / linear time.

Table 2: decode tokens/s of one token per step after a context of C tokens: the linear
layer's fixed-size state (``jaxattn.cache.LinearStateCache.update_and_attend``: attend and
fold the token in; ``--decode-steps`` tokens in one jitted ``lax.scan``, as ``generate``
loops; the state filled by a chunked prefill of C tokens; contexts timed interleaved)
against softmax attention of one query over C cached keys (the attention alone, no cache
write), and each one's tokens/s at C relative to its tokens/s at the first C.

  python -m benchmarks.linear                                   # T = 1K..16K, C = 1K, 32K, 128K
  python -m benchmarks.linear --lengths 4096 --contexts 1024 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks._timing import median_seconds
from jaxattn import dot_product_attention, masks
from jaxattn.cache import LinearStateCache
from jaxattn.ops import linear_attention

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _gates(variant, b, t, k, h, key):
    kg, kb = jax.random.split(key)
    out = {}
    if variant in ("simple_gla", "gated_delta_rule"):
        out["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(kg, (b, t, k))) / 16
    if variant == "gla":
        out["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(kg, (b, t, k, h))) / 16
    if variant in ("delta_rule", "gated_delta_rule"):
        out["beta"] = jax.nn.sigmoid(jax.random.normal(kb, (b, t, k)))
    return out


def _fwd_bwd(fn, args, repeats):
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)  # noqa: E731
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    mem = getattr(compiled.memory_analysis(), "temp_size_in_bytes", float("nan"))
    return median_seconds(compiled, args, repeats), mem / 2**20


def train_table(args):
    b, n, k, h = args.batch, args.heads, args.kv_heads, args.head_dim
    cols = [*args.variants, "softmax"]
    print("| T | " + " | ".join(f"{c} s" for c in cols) + " | "
          + " | ".join(f"{c} MiB" for c in cols) + " | "
          + " | ".join(f"softmax / {c}" for c in args.variants) + " |")  # fmt: skip
    print("|" + "---|" * (1 + 2 * len(cols) + len(args.variants)))
    for t in args.lengths:
        kq, kk, kv, kg = jax.random.split(jax.random.key(t), 4)
        q = jax.random.normal(kq, (b, t, n, h), args.dtype) / h**0.5
        key = jax.random.normal(kk, (b, t, k, h), args.dtype) / h**0.5
        v = jax.random.normal(kv, (b, t, k, h), args.dtype)
        res = {}
        for variant in args.variants:
            gates = _gates(variant, b, t, k, h, kg)
            if "beta" in gates:
                key_v = key / jnp.linalg.norm(key, axis=-1, keepdims=True)
            else:
                key_v = key
            fn = lambda q, k, v, g=gates, var=variant: linear_attention(  # noqa: E731
                q, k, v, variant=var, chunk_size=args.chunk, **g
            )
            res[variant] = _fwd_bwd(fn, (q, key_v, v), args.repeats)
        if t <= args.max_softmax_len:
            soft = lambda q, k, v: dot_product_attention(  # noqa: E731
                q, k, v, mask=masks.Causal(), implementation="chunked"
            )
            res["softmax"] = _fwd_bwd(soft, (q, key, v), args.repeats)
        fmt = lambda c, i, f: format(res[c][i], f) if c in res else "skip"  # noqa: E731
        ratio = lambda c: (  # noqa: E731
            f"{res['softmax'][0] / res[c][0]:.1f}x" if "softmax" in res else "-"
        )
        print(f"| {t} | " + " | ".join(fmt(c, 0, ".3f") for c in cols) + " | "
              + " | ".join(fmt(c, 1, ".0f") for c in cols) + " | "
              + " | ".join(ratio(c) for c in args.variants) + " |", flush=True)  # fmt: skip


def _linear_states(variant, contexts, b, n, k, h, chunk):
    """A LinearStateCache per context C, filled by a chunked prefill of C random tokens."""
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731

    def prefill(cache, key, ctx):
        kq, kk, kv, kg = jax.random.split(key, 4)
        q = jax.random.normal(kq, (b, ctx, n, h)) / h**0.5
        k_ = unit(jax.random.normal(kk, (b, ctx, k, h)))
        v = jax.random.normal(kv, (b, ctx, k, h))
        gates = _gates(variant, b, ctx, k, h, kg)
        return cache.update_and_attend(q, k_, v, variant=variant, chunk_size=chunk, **gates)[1]

    empty = LinearStateCache.create(batch=b, num_kv_heads=k, head_dim=h, state_dim=h)
    fill = jax.jit(prefill, static_argnums=2)
    return {ctx: fill(empty, jax.random.key(ctx), ctx) for ctx in contexts}


def _linear_decode_steps(variant, b, n, k, h, steps):
    """jit(cache -> cache after ``steps`` one-token decode steps in a lax.scan), and its
    inputs: the per-token decode loop of ``generate``, without the sampling."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (steps, b, 1, n, h)) / h**0.5
    k_ = jax.random.normal(kk, (steps, b, 1, k, h))
    k_ = k_ / jnp.linalg.norm(k_, axis=-1, keepdims=True)
    v = jax.random.normal(kv, (steps, b, 1, k, h))
    gates = jax.tree.map(
        lambda x: x.swapaxes(0, 1)[:, :, None], _gates(variant, b, steps, k, h, kg)
    )

    def run(cache, xs):
        def step(cache, x):
            o, cache = cache.update_and_attend(*x[:3], variant=variant, **x[3])
            return cache, o[:, 0, 0, 0]

        return jax.lax.scan(step, cache, xs)

    return jax.jit(run), (q, k_, v, gates)


def _softmax_decode(ctx, b, n, k, h, dtype, repeats, clock):
    """One query over C cached keys: the attention alone ("auto": the "decode" implementation
    on CPU), without the cache write (which, undonated, would copy the whole cache)."""
    kk, kv, kq = jax.random.split(jax.random.key(ctx), 3)
    keys = jax.random.normal(kk, (b, ctx, k, h), dtype)
    values = jax.random.normal(kv, (b, ctx, k, h), dtype)
    q = jax.random.normal(kq, (b, 1, n, h), dtype)
    fn = jax.jit(
        lambda q, k_, v: dot_product_attention(
            q, k_, v, mask=masks.Causal(), q_offset=ctx - 1, implementation="auto"
        )
    )
    return 1.0 / median_seconds(fn, (q, keys, values), repeats, min_run_s=0.2, clock=clock)


def decode_table(args):
    b, n, k, h = args.batch, args.heads, args.kv_heads, args.head_dim
    variant, steps, clock = args.variants[0], args.decode_steps, CLOCKS[args.clock]
    states = _linear_states(variant, args.contexts, b, n, k, h, args.chunk)
    run, xs = _linear_decode_steps(variant, b, n, k, h, steps)
    # contexts interleaved, one timed run of each per round: drift of a shared machine's load
    # hits every context alike
    times = {ctx: [] for ctx in args.contexts}
    for _ in range(args.repeats):
        for ctx in args.contexts:
            times[ctx].append(median_seconds(run, (states[ctx], xs), 1, clock=clock))
    print(f"| context | {variant} state tok/s | vs first | softmax attention tok/s | vs first |")
    print("|---|---|---|---|---|")
    first = {}
    for ctx in args.contexts:
        lin = steps / statistics.median(times[ctx])
        soft = _softmax_decode(ctx, b, n, k, h, args.dtype, args.repeats, clock)
        first.setdefault("lin", lin)
        first.setdefault("soft", soft)
        print(f"| {ctx} | {lin:.0f} | {lin / first['lin']:.3f} | {soft:.0f} | "
              f"{soft / first['soft']:.3f} |", flush=True)  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768, 131072])
    p.add_argument("--variants", nargs="+", default=["gated_delta_rule", "linear_attn"])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-softmax-len", type=int, default=16384)
    p.add_argument("--tables", nargs="+", default=["train", "decode"])
    p.add_argument("--decode-steps", type=int, default=256, help="tokens per timed decode run")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine)",
    )
    args = p.parse_args(argv)
    args.dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(f"# device: {dev.platform} {dev.device_kind}, jax {jax.__version__}, {args.dtype}; "
          f"B={args.batch} N={args.heads} K={args.kv_heads} H={args.head_dim} "
          f"chunk={args.chunk}; median of {args.repeats}; {args.clock} clock")  # fmt: skip
    if "train" in args.tables:
        train_table(args)
    if "decode" in args.tables:
        decode_table(args)


if __name__ == "__main__":
    main()
