"""Shared helpers of the block-visit tests: random visit lists and their dense reference mask.

The dense mask is built in numpy straight from the lists' definition (query row i in list row
i // block_q, key j in kv block j // block_kv), independently of the library's builder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import dot_product_attention, masks

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ROW_KINDS = ("empty", "full", "random")


def fast_jit(fn):
    """fn jitted and compiled with FAST_COMPILE (XLA's CPU backend optimisations off: the
    tests' one-shot programs compile ~2x faster and run as exactly), positional args only;
    each call compiles once for its shapes."""
    jitted = jax.jit(fn)
    return lambda *args: jitted.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def random_visits(rng, *, Bv, Kv, T, S, block_q, block_kv, L, kinds=ROW_KINDS):
    """BlockVisits with rows that are empty, full, or random (unsorted, with duplicates), and
    garbage in the unused slots (which must be ignored)."""
    Q, nk = -(-T // block_q), -(-S // block_kv)
    idx = rng.integers(-7, nk + 7, (Bv, Kv, Q, L))  # garbage past the counts
    cnt = np.zeros((Bv, Kv, Q), np.int32)
    for b, k, r in np.ndindex(Bv, Kv, Q):
        kind = kinds[rng.integers(len(kinds))]
        if kind == "full":
            row = rng.permutation(nk)[:L]
        elif kind == "random":
            row = rng.integers(0, nk, rng.integers(1, L + 1))  # duplicates, any order
        else:
            row = np.zeros(0, int)
        idx[b, k, r, : len(row)] = row
        cnt[b, k, r] = len(row)
    return masks.BlockVisits(
        indices=jnp.asarray(idx, jnp.int32),
        counts=jnp.asarray(cnt),
        block_q=block_q,
        block_kv=block_kv,
    )


def dense_from_visits(visits, *, B, N, K, T, S):
    """bool [B, N, T, S]: key j visible to query row i of head n when j's block is listed."""
    idx, cnt = np.asarray(visits.indices), np.asarray(visits.counts)
    Bv, Kv, Q, _ = idx.shape
    member = np.zeros((Bv, Kv, Q, -(-S // visits.block_kv)), bool)
    for b, k, r in np.ndindex(Bv, Kv, Q):
        member[b, k, r, idx[b, k, r, : cnt[b, k, r]]] = True
    rows, cols = np.arange(T) // visits.block_q, np.arange(S) // visits.block_kv
    m = member[:, :, rows][:, :, :, cols]  # [Bv, Kv, T, S]
    m = np.broadcast_to(m, (B, K, T, S))
    return np.repeat(m, N // K, axis=1)  # query head n reads kv head n // G


def normal(seed, *shapes, dtype=jnp.float32):
    """Standard normal arrays of the given shapes from numpy (jax.random compiles per shape)."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype) for s in shapes]


def inputs(seed, B, T, S, N, K, H, V, dtype=jnp.float32, Kv=None):
    q, k, v = normal(seed, (B, T, N, H), (B, S, K, H), (B, S, Kv or K, V), dtype=dtype)
    (do,) = normal(seed + 1, (B, T, N, V))
    return q, k, v, do


def compile_value_and_grads(fns, q, k, v, dos):
    """One compiled call (q, k, v, dos) -> [(o, lse or None, (dq, dk, dv))] of each fn: the
    gradients of <o, do> (+ ½·sum of finite lse) with its own cotangent do; reusable for
    other inputs of the same shapes (one compile per case)."""

    def one(fn, q, k, v, do):
        def loss(q, k, v):
            out = fn(q, k, v)
            o, lse = out if isinstance(out, tuple) else (out, None)
            total = (o.astype(jnp.float32) * do).sum()
            if lse is not None:
                total = total + 0.5 * jnp.where(jnp.isfinite(lse), lse, 0.0).sum()
            return total, (o, lse)

        (_, (o, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return o, lse, grads

    run = jax.jit(lambda q, k, v, dos: [one(f, q, k, v, d) for f, d in zip(fns, dos)])
    return run.lower(q, k, v, list(dos)).compile(compiler_options=FAST_COMPILE)


def value_and_grads_many(fns, q, k, v, dos):
    """[(o, lse or None, (dq, dk, dv))] of each fn (see :func:`compile_value_and_grads`)."""
    return compile_value_and_grads(fns, q, k, v, dos)(q, k, v, list(dos))


def value_and_grads(fn, q, k, v, do):
    """(o, lse or None) and the gradients of <o, do> (+ ½·sum of finite lse) for q, k, v."""
    return value_and_grads_many([fn], q, k, v, [do])[0]


def op(impl, **kw):
    return lambda q, k, v: dot_product_attention(q, k, v, implementation=impl, **kw)


def assert_close(got, want, tol, what=""):
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=what, **tol
    )


def seen_rows(dense_BNTS):
    """bool [B, T, N, 1]: rows that see at least one key."""
    return jnp.asarray(np.asarray(dense_BNTS).any(-1).transpose(0, 2, 1)[..., None])


def jax_nn(dense_BNTS):
    """jax.nn.dot_product_attention under a dense mask: the outside reference (undefined on
    rows that see no key: compare there with a zero cotangent and ignore the output)."""
    mask = jnp.asarray(dense_BNTS)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)


def jax_nn_case(fn, do, dense_BNTS):
    """The two (fn, do) pairs of a comparison with jax.nn under the dense mask (zero cotangent
    on unseen rows), for :func:`value_and_grads_many`."""
    do = jnp.asarray(np.where(np.asarray(seen_rows(dense_BNTS)), np.asarray(do), 0.0), do.dtype)
    return [(fn, do), (jax_nn(dense_BNTS), do)]  # numpy where: no eager compile per shape


def check_jax_nn(got, want, dense_BNTS, tol):
    """fn's output on seen rows and its gradients against jax.nn's (results of jax_nn_case)."""
    seen = np.asarray(seen_rows(dense_BNTS))
    o, o_want = (np.where(seen, np.asarray(x, np.float32), 0) for x in (got[0], want[0]))
    assert_close(o, o_want, tol, "o vs jax.nn")
    for name, g, w in zip(("dq", "dk", "dv"), got[2], want[2]):
        assert_close(g, w, tol, f"{name} vs jax.nn")


def compare_with_jax_nn(fn, q, k, v, do, dense_BNTS, tol):
    """fn's output on seen rows and its gradients (zero cotangent on unseen rows) against
    jax.nn under the dense mask, in one compiled call."""
    fns, dos = zip(*jax_nn_case(fn, do, dense_BNTS))
    got, want = value_and_grads_many(fns, q, k, v, dos)
    check_jax_nn(got, want, dense_BNTS, tol)
    return got
