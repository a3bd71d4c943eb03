"""Sparse attention against full attention: NSA and the block-sparse primitive, one run.

Table 1, for each T: forward and forward+backward wall time (median of ``--repeats`` after a
warm-up) and the compiled program's temporary memory (``memory_analysis()``) of NSA
(``jaxattn.ops.nsa.nsa_attention`` with the compression of keys and values inside the timed
function; ``--sel-block`` 64, ``--top-n`` 16, ``--window`` 512, compression 32 / 16 as the
paper) against full causal ``dot_product_attention(implementation="chunked")``, with the
ratio full / NSA.

Table 2, for each T: the block-sparse primitive (``block_visits=``: a random ``--density``
fraction of ``--block`` x ``--block`` blocks per query block, shared by the heads) against the
same mask given to the op as a dense bool [T, T] array, both "chunked", forward+backward.

On a GPU the same tables come from the same code (the op picks its kernels); TFLOP/s of the
visited blocks is printed as the last column of table 2 (4·B·N·H·visited keys·rows per
forward, 2.5x that for the backward).

  python -m benchmarks.sparse                      # T = 4K, 16K
  python -m benchmarks.sparse --lengths 65536 --repeats 1
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import median_seconds
from jaxattn import dot_product_attention, masks
from jaxattn.ops import nsa


def _compile(fn, args, grad: bool, n_diff=None):
    f = fn
    if grad:  # the first n_diff arguments (default all) are differentiated
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)  # noqa: E731
        f = jax.grad(loss, argnums=tuple(range(n_diff or len(args))))
    compiled = jax.jit(f).lower(*args).compile()
    mem = getattr(compiled.memory_analysis(), "temp_size_in_bytes", float("nan"))
    return compiled, mem / 2**20


def _time(fn, args, repeats, grad, n_diff=None):
    compiled, mem = _compile(fn, args, grad, n_diff)
    return median_seconds(compiled, args, repeats), mem


def _inputs(args, t, key=0):
    b, n, k, h = args.batch, args.heads, args.kv_heads, args.head_dim
    ks = jax.random.split(jax.random.key(key), 6)
    q = jax.random.normal(ks[0], (b, t, n, h))
    kk = jax.random.normal(ks[1], (b, t, k, h))
    v = jax.random.normal(ks[2], (b, t, k, h))
    gates = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, n, 3)))
    w = jax.random.normal(ks[4], (2, args.cmp_block, h, h)) / np.sqrt(args.cmp_block * h)
    return q, kk, v, gates, w


def _nsa_fn(args):
    sizes = dict(
        block=args.cmp_block,
        stride=args.cmp_stride,
        sel_block=args.sel_block,
        top_n=args.top_n,
        window=args.window,
    )
    pos = jnp.zeros((args.cmp_block, args.head_dim))

    def fn(q, k, v, gates, w):
        phi = lambda i: lambda x: jnp.einsum("...lh,lho->...o", x, w[i])  # noqa: E731
        kc = nsa.compress(k, phi(0), pos, block=sizes["block"], stride=sizes["stride"])
        vc = nsa.compress(v, phi(1), pos, block=sizes["block"], stride=sizes["stride"])
        return nsa.nsa_attention(q, k, v, gates, kc, vc, **sizes)

    return fn


def _full(q, k, v, gates, w):
    return dot_product_attention(q, k, v, mask=masks.Causal(), implementation="chunked")


def nsa_table(args):
    print("NSA (compressed + selected + window, gated) vs full causal 'chunked', fp32")
    print(
        "| T | NSA fwd s | full fwd s | fwd ratio | NSA fwd+bwd s | full fwd+bwd s "
        "| fwd+bwd ratio | NSA MiB | full MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    fn = _nsa_fn(args)
    for t in args.lengths:
        x = _inputs(args, t)
        nf, _ = _time(fn, x, args.repeats, grad=False)
        ff, _ = _time(_full, x[:3] + (x[3], x[4]), args.repeats, grad=False)
        nb, nm = _time(fn, x, args.repeats, grad=True)
        fb, fm = _time(_full, x, args.repeats, grad=True)
        print(
            f"| {t} | {nf:.3f} | {ff:.3f} | {ff / nf:.2f}x | {nb:.3f} | {fb:.3f} "
            f"| {fb / nb:.2f}x | {nm:.0f} | {fm:.0f} |",
            flush=True,
        )


def _layout(args, t, rng):
    """Random block layout [nq, nk] with ``density`` of the blocks set, each row non-empty."""
    nq = -(-t // args.block)
    L = max(1, round(args.density * nq))
    idx = np.stack([rng.choice(nq, L, replace=False) for _ in range(nq)])
    return idx.astype(np.int32), L


def primitive_table(args):
    print(
        f"\nblock-sparse primitive (block_visits, {args.block}x{args.block} blocks, "
        f"{args.density:.0%} per row) vs the same mask as a dense bool array, 'chunked', fwd+bwd"
    )
    print("| T | visits s | dense-mask s | ratio | visits MiB | dense-mask MiB | visits TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for t in args.lengths:
        q, k, v, _, _ = _inputs(args, t, key=1)
        idx, L = _layout(args, t, rng)
        nq = idx.shape[0]
        member = np.zeros((nq, nq), bool)
        np.put_along_axis(member, idx, True, axis=1)
        dense = jnp.asarray(np.kron(member, np.ones((args.block, args.block), bool))[:t, :t])

        def sparse_fn(q, k, v, idx):  # the lists are an argument, as when computed from data
            visits = masks.BlockVisits(
                indices=idx,
                counts=jnp.full((1, 1, nq), L, jnp.int32),
                block_q=args.block,
                block_kv=args.block,
            )
            return dot_product_attention(q, k, v, block_visits=visits, implementation="chunked")

        def dense_fn(q, k, v, dense):
            return dot_product_attention(q, k, v, mask=dense, implementation="chunked")

        idx_j = jnp.asarray(idx[None, None])
        st, sm = _time(sparse_fn, (q, k, v, idx_j), args.repeats, grad=True, n_diff=3)
        dt, dm = _time(dense_fn, (q, k, v, dense), args.repeats, grad=True, n_diff=3)
        flops = 3.5 * 4 * args.batch * args.heads * args.head_dim * t * L * args.block
        print(
            f"| {t} | {st:.3f} | {dt:.3f} | {dt / st:.2f}x | {sm:.0f} | {dm:.0f} "
            f"| {flops / st / 1e12:.3f} |",
            flush=True,
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cmp-block", type=int, default=32)
    p.add_argument("--cmp-stride", type=int, default=16)
    p.add_argument("--sel-block", type=int, default=64)
    p.add_argument("--top-n", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--block", type=int, default=128, help="primitive's block size")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tables", nargs="+", default=["nsa", "primitive"])
    args = p.parse_args(argv)
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    if "nsa" in args.tables:
        nsa_table(args)
    if "primitive" in args.tables:
        primitive_table(args)


if __name__ == "__main__":
    main()
