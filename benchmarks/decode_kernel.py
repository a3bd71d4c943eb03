"""Decode attention (flash-decoding) kernel: time and achieved HBM bandwidth.

Decoding reads the whole live KV cache once per step, so it is memory-bound: the figure of
merit is bytes of cache read / time, against the chip's HBM bandwidth. For each configuration
this prints the median time (after one warm-up) and GB/s of:

  "pallas_tpu"  pallas_kernels.decode_attention.decode_attention_tpu (Mosaic TPU; TPU only)
  "reference"   its plain-jnp fp32 reference (materialises scores)
  "jax.nn"      jax.nn.dot_product_attention with key_value_seq_lengths (T = 1, H = V only)

On a machine without a TPU the kernel column says so (the Mosaic kernel only runs on TPU;
its interpreter measures nothing useful) and small shapes are used.

  python -m benchmarks.decode_kernel             # defaults per platform
  python -m benchmarks.decode_kernel --cache 32768 --batch 4 --repeats 20
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks._devices import hbm_gbps
from benchmarks._timing import median_seconds
from pallas_kernels.decode_attention import decode_attention_reference, decode_attention_tpu

# name: (T, N, K, H, V, shared_kv)
CONFIGS = {
    "gqa_g4_h128_t1": (1, 32, 8, 128, 128, False),
    "spec_g4_h128_t4": (4, 32, 8, 128, 128, False),
    "mla_g16_h576_t1": (1, 16, 1, 576, 576, True),  # absorbed MLA: latent cache is k and v
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_tpu = jax.default_backend() == "tpu"
    p.add_argument("--batch", type=int, default=8 if on_tpu else 2)
    p.add_argument("--cache", type=int, default=16384 if on_tpu else 1024)
    p.add_argument("--fill", type=float, default=0.75, help="live fraction of the cache")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=10 if on_tpu else 3)
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    bw = hbm_gbps()
    print(
        f"# {jax.devices()[0].device_kind}, HBM {bw or '?'} GB/s, cache {args.cache}, "
        f"fill {args.fill}, batch {args.batch}, {dtype.name}"
    )
    if not on_tpu:
        print("# pallas_tpu: needs a TPU (Mosaic); only the XLA paths are timed here")
    print(f"{'config':<18} {'impl':<11} {'ms':>9} {'GB/s':>8} {'% HBM':>6}")
    for name, (T, N, K, H, V, shared) in CONFIGS.items():
        B, C = args.batch, args.cache
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(kq, (B, T, N, H), dtype)
        k = jax.random.normal(kk, (B, C, K, H), dtype)
        v = k if shared else jax.random.normal(kv, (B, C, K, V), dtype)
        lens = jnp.full((B,), int(C * args.fill), jnp.int32)
        # Bytes the kernel must read: the live part of the cache (k and v, once if shared).
        live_bytes = B * int(C * args.fill) * K * (H + (0 if shared else V)) * dtype.itemsize
        impls = {"reference": jax.jit(decode_attention_reference)}
        if on_tpu:
            impls["pallas_tpu"] = jax.jit(decode_attention_tpu)
        if T == 1 and H == V and not shared:
            impls["jax.nn"] = jax.jit(
                lambda q, k, v, lens: jax.nn.dot_product_attention(
                    q, k, v, key_value_seq_lengths=lens
                )
            )
        for impl, fn in impls.items():
            sec = median_seconds(fn, (q, k, v, lens), args.repeats)
            gbps = live_bytes / sec / 1e9
            pct = f"{100 * gbps / bw:6.1f}" if bw else "     ?"
            print(f"{name:<18} {impl:<11} {sec * 1e3:9.3f} {gbps:8.1f} {pct}")


if __name__ == "__main__":
    main()
