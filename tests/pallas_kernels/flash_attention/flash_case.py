"""Shared helpers of the flash attention kernel tests: build a case, run kernel and reference.

Kernels run in TPU interpret mode (``pltpu.InterpretParams``, with the race detector) on
CPU, or (``fn=flash_attention_gpu``) in the Mosaic GPU interpreter; XLA's backend
optimisations are turned off for these programs since compile time, not run time,
dominates the interpreter's cost here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import BlockSizes, attention_reference, flash_attention

INTERPRET = pltpu.InterpretParams(detect_races=True)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SMALL = BlockSizes(block_q=32, block_kv=32, block_q_bwd=32, block_kv_bwd=32)


def make_inputs(seed, *, B, T, S, N, K, H, V, dtype=jnp.float32):
    kq, kk, kv, ko, kl = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, V), jnp.float32).astype(dtype)
    do = jax.random.normal(ko, (B, T, N, V), jnp.float32).astype(dtype)
    dlse = jax.random.normal(kl, (B, N, T), jnp.float32)
    return q, k, v, do, dlse


def _run(attn, q, k, v, do, dlse, segs, kv_lengths, q_offset, *, traced_offset, grad):
    """o, lse and (if grad) dq, dk, dv of ``attn`` under one jit."""

    def fn(q, k, v, segs, kv_lengths, off):
        off = off if traced_offset else q_offset
        call = lambda q, k, v: attn(q, k, v, segment_ids=segs, kv_lengths=kv_lengths, q_offset=off)
        if not grad:
            return call(q, k, v)
        (o, lse), vjp = jax.vjp(call, q, k, v)
        return (o, lse), vjp((do, dlse))

    jitted = jax.jit(fn, compiler_options=FAST_COMPILE)
    return jitted(q, k, v, segs, kv_lengths, jnp.int32(q_offset))


def check_case(
    *,
    B=1,
    T,
    S=None,
    N,
    K,
    H,
    V=None,
    mask=None,
    dtype=jnp.float32,
    segments=False,
    soft_cap=None,
    q_offset=0,
    traced_offset=False,
    kv_lengths=None,
    block_sizes=SMALL,
    grad=True,
    seed=0,
    interpret=INTERPRET,
    fn=flash_attention,
):
    """Compares flash_attention with the reference: o, lse and dq, dk, dv (with an lse
    cotangent)."""
    S = T if S is None else S
    V = H if V is None else V
    q, k, v, do, dlse = make_inputs(seed, B=B, T=T, S=S, N=N, K=K, H=H, V=V, dtype=dtype)
    segs = None
    if segments:  # two or three segments per sequence, boundaries differ per batch row
        rng = np.random.default_rng(seed)
        q_seg = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
        kv_seg = np.sort(rng.integers(0, 3, (B, S)), axis=1).astype(np.int32)
        segs = (jnp.asarray(q_seg), jnp.asarray(kv_seg))
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    common = dict(mask=mask, logits_soft_cap=soft_cap, return_lse=True)
    kernel = lambda q, k, v, **kw: fn(
        q, k, v, block_sizes=block_sizes, interpret=interpret, **common, **kw
    )
    ref = lambda q, k, v, **kw: attention_reference(q, k, v, **common, **kw)
    args = (q, k, v, do, dlse, segs, kv_lengths, q_offset)
    got = _run(kernel, *args, traced_offset=traced_offset, grad=grad)
    want = _run(ref, *args, traced_offset=traced_offset, grad=grad)
    _check_no_races(gpu=fn is not flash_attention)
    low = dtype != jnp.float32
    tol = dict(atol=3e-2, rtol=3e-2) if low else dict(atol=2e-4, rtol=2e-4)
    names = ["o", "lse"] + (["dq", "dk", "dv"] if grad else [])
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    for name, g, w in zip(names, flat_got, flat_want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g) | (name == "lse")), f"{name} has NaN/inf"
        scale = 1.0 if not low else max(1.0, float(np.max(np.abs(w[np.isfinite(w)]), initial=1)))
        np.testing.assert_allclose(g, w, atol=tol["atol"] * scale, rtol=tol["rtol"], err_msg=name)
    return got


def _check_no_races(gpu=False):
    """Fails if the interpreter's race detector (private state; best effort) saw a race."""
    try:
        if gpu:
            from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

            races = ipc.get_races()
        else:
            from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

            races = getattr(ipc, "races", None)
    except (ImportError, AttributeError, AssertionError):  # moved, or no state: nothing to check
        return
    assert not getattr(races, "races_found", False), "race detected in a kernel"
