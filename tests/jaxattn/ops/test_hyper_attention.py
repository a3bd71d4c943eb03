"""HyperAttention (jaxattn.ops.hyper_attention): one bucket and all columns sampled == exact
softmax attention; the error falls as the samples grow; LSH sort/unsort round-trips; the block
diagonal alone with one block == exact; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from visit_case import (
    FAST_COMPILE,
    fast_jit,
    normal,
)  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn import dot_product_attention
from jaxattn.ops import hyper_attention as ha


def _qkv(T=64, N=2, H=8):
    return normal(0, *[(2, T, N, H)] * 3)


def test_one_bucket_full_sampling_is_exact():
    q, k, v = _qkv()

    @fast_jit  # one compile for the three calls
    def run(q, k, v):
        exact = dot_product_attention(q, k, v, implementation="xla")
        key = jax.random.key(1)
        got = ha.hyper_attention(q, k, v, key, num_planes=0, block=16, num_samples=64)
        return exact, got, ha.hyper_attention(q, k, v, key, num_planes=3, block=64, num_samples=0)

    exact, got, one_block = run(q, k, v)
    np.testing.assert_allclose(got, exact, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(one_block, exact, atol=2e-5, rtol=2e-5)


def test_error_falls_with_samples():
    q, k, v = _qkv()
    exact = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla"))(q, k, v)
    err = jax.jit(
        lambda key, m: jnp.abs(
            ha.hyper_attention(q, k, v, key, num_planes=2, block=8, num_samples=m) - exact
        ).mean(),
        static_argnums=1,
    )
    keys = [jax.random.key(s) for s in range(4)]
    errs = []
    for m in (4, 16, 48):  # one compile per sample count, reused for the 4 seeds
        run = err.lower(keys[0], m).compile(compiler_options=FAST_COMPILE)
        errs.append(np.mean([float(run(key)) for key in keys]))
    assert errs[0] > errs[1] > errs[2], errs


def test_lsh_sort_unsort_round_trip_and_bad_input():
    x, planes = normal(2, (1, 32, 8), (8, 3))
    b = np.asarray(jax.jit(ha.lsh_buckets)(x, planes))
    assert b.min() >= 0 and b.max() < 8
    order = np.argsort(b, axis=1)
    back = np.take_along_axis(
        np.take_along_axis(np.asarray(x), order[..., None], 1), np.argsort(order, 1)[..., None], 1
    )
    np.testing.assert_array_equal(back, x)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="num_samples=65 must be in"):
        ha.hyper_attention(q, k, v, jax.random.key(0), num_planes=1, block=16, num_samples=65)
    with pytest.raises(ValueError, match="block=24 must divide"):
        ha.hyper_attention(q, k, v, jax.random.key(0), num_planes=1, block=24, num_samples=4)


def _causal(q, k, v, key, **kw):
    return ha.causal_hyper_attention(q, k, v, key, implementation="xla", **kw)


def test_causal_full_sampling_is_exact_causal():
    """Algorithm 4: two causal diagonal halves (recursive) + the unmasked off-diagonal estimate,
    merged by their normalizers; one bucket and all columns sampled (or one diagonal block per
    off-diagonal) at every level == exact causal softmax attention. T = 32 down to 8: two levels
    of the recursion, four exact causal leaves."""
    q, k, v = _qkv(T=32)

    @fast_jit  # one compile for the three
    def run(q, k, v):
        key = jax.random.key(2)
        return (
            jax.nn.dot_product_attention(q, k, v, is_causal=True),
            _causal(q, k, v, key, num_planes=0, block=4, num_samples=32, min_seq_len=8),
            _causal(q, k, v, key, num_planes=3, block=32, num_samples=0, min_seq_len=8),
        )

    exact, sampled, one_block = run(q, k, v)
    np.testing.assert_allclose(sampled, exact, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(one_block, exact, atol=2e-5, rtol=2e-5)


def test_causal_leaks_nothing_from_the_future():
    """Approximate causal form (LSH buckets, few samples): the gradient of the first t0 outputs
    with respect to keys and values at positions >= t0 is exactly zero, and the estimate is not
    the exact answer (so the check covers the sampled off-diagonal parts). T = 32 down to 8;
    t0 = 20 falls inside a leaf and after the first level's split."""
    q, k, v = _qkv(T=32)
    t0 = 20

    @fast_jit  # one compile: forward and backward from one vjp
    def run(q, k, v):
        fn = lambda k, v: _causal(  # noqa: E731
            q, k, v, jax.random.key(3), num_planes=2, block=4, num_samples=3, min_seq_len=8
        )
        approx, vjp = jax.vjp(fn, k, v)
        gk, gv = vjp(jnp.zeros_like(approx).at[:, :t0].set(1.0))
        return gk, gv, approx, jax.nn.dot_product_attention(q, k, v, is_causal=True)

    gk, gv, approx, exact = run(q, k, v)
    np.testing.assert_array_equal(np.asarray(gk)[:, t0:], 0.0)
    np.testing.assert_array_equal(np.asarray(gv)[:, t0:], 0.0)
    assert np.abs(np.asarray(gk)[:, :t0]).max() > 0
    assert np.abs(np.asarray(gv)[:, 16:t0]).max() > 0  # rows past the split read their prefix
    assert np.abs(np.asarray(approx) - np.asarray(exact)).max() > 1e-3
    with pytest.raises(ValueError, match="length 24 is odd or its half"):
        ha.causal_hyper_attention(
            *_qkv(T=48), jax.random.key(0), num_planes=1, block=8, num_samples=4, min_seq_len=8
        )
    with pytest.raises(ValueError, match="min_seq_len=0 must be"):
        ha.causal_hyper_attention(
            q, k, v, jax.random.key(0), num_planes=1, block=4, num_samples=4, min_seq_len=0
        )
