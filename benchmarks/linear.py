"""Linear attention against softmax attention: training time and memory vs T, decode vs context.

Table 1, for each T: forward+backward wall time (median of ``--repeats`` after a warm-up) and
the compiled program's temporary memory (``memory_analysis().temp_size_in_bytes``) of
``jaxattn.ops.linear_attention`` (chunked form, ``--variants``) and of
``jaxattn.dot_product_attention(mask=Causal(), implementation="chunked")``, in one run, with
the ratio softmax time / linear time.

Table 2: decode tokens/s of one token per step after a context of C tokens: the linear
layer's fixed-size state (``jaxattn.cache.LinearStateCache``, filled by a chunked prefill of C
tokens) against a dense KV cache (``jaxattn.cache.KVCache`` holding C tokens, the "auto"
decode attention), and each one's tokens/s at C relative to its tokens/s at the first C.

  python -m benchmarks.linear                                   # T = 1K..16K, C = 1K, 32K, 128K
  python -m benchmarks.linear --lengths 4096 --contexts 1024 8192 --repeats 3
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks._timing import median_seconds
from jaxattn import dot_product_attention, masks
from jaxattn.cache import KVCache, LinearStateCache
from jaxattn.ops import linear_attention


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


def _linear_decode(variant, ctx, b, n, k, h, chunk, repeats):
    key = jax.random.key(ctx)
    kq, kk, kv, kg = jax.random.split(key, 4)
    mk = lambda kk, t, heads: jax.random.normal(kk, (b, t, heads, h)) / h**0.5  # noqa: E731
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731

    def step(cache, q, k_, v, gates):
        return cache.update_and_attend(q, k_, v, variant=variant, chunk_size=chunk, **gates)

    cache = LinearStateCache.create(batch=b, num_kv_heads=k, head_dim=h, state_dim=h)
    prefill = jax.jit(step)
    _, cache = prefill(cache, mk(kq, ctx, n), unit(mk(kk, ctx, k)), mk(kv, ctx, k),
                       _gates(variant, b, ctx, k, h, kg))  # fmt: skip
    one = (mk(kq, 1, n), unit(mk(kk, 1, k)), mk(kv, 1, k), _gates(variant, b, 1, k, h, kg))
    fn = jax.jit(step)
    return 1.0 / median_seconds(fn, (cache, *one), repeats, min_run_s=0.2)


def _softmax_decode(ctx, b, n, k, h, dtype, repeats):
    kk, kv, kq = jax.random.split(jax.random.key(ctx), 3)
    cache = KVCache.create(batch=b, capacity=ctx + 1, num_kv_heads=k, head_dim=h, dtype=dtype)
    cache = cache.replace(
        k_BCKH=jax.random.normal(kk, cache.k_BCKH.shape, dtype),
        v_BCKV=jax.random.normal(kv, cache.v_BCKV.shape, dtype),
    ).with_lengths(ctx)
    q = jax.random.normal(kq, (b, 1, n, h), dtype)
    fn = jax.jit(lambda c, q, k_, v: c.update_and_attend(q, k_, v, mask=masks.Causal()))
    return 1.0 / median_seconds(fn, (cache, q, q[:, :, :k], q[:, :, :k]), repeats, min_run_s=0.2)


def decode_table(args):
    b, n, k, h = args.batch, args.heads, args.kv_heads, args.head_dim
    variant = args.variants[0]
    print(f"| context | {variant} state tok/s | vs first | softmax KV-cache tok/s | vs first |")
    print("|---|---|---|---|---|")
    first = {}
    for ctx in args.contexts:
        lin = _linear_decode(variant, ctx, b, n, k, h, args.chunk, args.repeats)
        soft = _softmax_decode(ctx, b, n, k, h, args.dtype, args.repeats)
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
    args = p.parse_args(argv)
    args.dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(f"# device: {dev.platform} {dev.device_kind}, jax {jax.__version__}, {args.dtype}; "
          f"B={args.batch} N={args.heads} K={args.kv_heads} H={args.head_dim} "
          f"chunk={args.chunk}; median of {args.repeats}")  # fmt: skip
    if "train" in args.tables:
        train_table(args)
    if "decode" in args.tables:
        decode_table(args)


if __name__ == "__main__":
    main()
