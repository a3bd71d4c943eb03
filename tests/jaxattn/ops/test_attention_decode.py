"""jaxattn.dot_product_attention: the "decode" implementation against the "xla" reference.

Few queries (T = 1, 3) over key axes that are and are not block multiples (the last block slides
back), every mask kind, GQA group sizes 1, 4 and 8, per-sequence offsets and lengths as in
ragged decoding, segment ids, soft cap, dense masks, keys shared as values (absorbed MLA), fully
masked rows, bf16; outputs, LSE and gradients of q, k, v.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import dot_product_attention as attention
from jaxattn import masks
from jaxattn.ops import DecodeBlockSizes
from jaxattn.ops._attention_args import check_args
from jaxattn.ops.attention import _choose
from jaxattn.ops.attention_chunked import tables_for

BLOCKS = DecodeBlockSizes(block_kv=16)
TOL = dict(atol=2e-5, rtol=2e-5)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

MASKS = {
    "none": None,
    "causal": masks.Causal(),
    "window": masks.SlidingWindow(left=9, right=0),
    "window2sided": masks.SlidingWindow(left=9, right=5),
    "sink": masks.SinkWindow(sinks=3, window=12),
    "chunkedcausal": masks.ChunkedCausal(chunk=20),
    "blocksparse": masks.BlockSparse(
        layout=np.random.default_rng(1).random((1, 4)) < 0.6, block_q=64, block_kv=16
    ),
    "or": masks.ChunkedCausal(chunk=16) | masks.SinkWindow(sinks=2, window=8),
    "dense": "dense",
}


def _inputs(B, T, S, N, K, H, V, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, S, K, H), dtype)
    v = jax.random.normal(kv, (B, S, K, V), dtype)
    do = jax.random.normal(kd, (B, T, N, V), jnp.float32)
    return q, k, v, do


def _value_and_grads(impl, q, k, v, do, shared_kv=False, **kw):
    """(o, lse) and the gradients of <o, do> + sum(finite lse) for q, k (and v)."""

    def f(q, k, v):
        v = k if shared_kv else v
        o, lse = attention(q, k, v, implementation=impl, return_lse=True, **kw)
        lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0).sum()
        return (o.astype(jnp.float32) * do).sum() + 0.5 * lse_term, (o, lse)

    vg = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    vg = jax.jit(vg).lower(q, k, v).compile(compiler_options=FAST_COMPILE)
    (_, (o, lse)), grads = vg(q, k, v)
    return o, lse, grads


def _compare(q, k, v, do, tol=TOL, shared_kv=False, **kw):
    want = _value_and_grads("xla", q, k, v, do, shared_kv, **kw)
    got = _value_and_grads("decode", q, k, v, do, shared_kv, block_sizes=BLOCKS, **kw)
    for name, g, w in zip(("o", "lse", "grads"), got, want):
        for i, (gi, wi) in enumerate(zip(jax.tree.leaves(g), jax.tree.leaves(w))):
            np.testing.assert_allclose(
                np.asarray(gi, np.float32), np.asarray(wi, np.float32), err_msg=f"{name}{i}", **tol
            )
    return got


CASES = [(m, g, t, s) for m in MASKS for g, t, s in ((1, 1, 64), (4, 3, 71), (8, 1, 53))]


@pytest.mark.parametrize(
    "mname, g, t, s", CASES, ids=[f"{m}_g{g}_t{t}_s{s}" for m, g, t, s in CASES]
)
def test_decode_matches_reference(mname, g, t, s):
    B, K = 2, 2 if g < 8 else 1
    q, k, v, do = _inputs(B, t, s, K * g, K, 32, 24, seed=g + t)
    mask = MASKS[mname]
    if mask == "dense":
        mask = jax.random.bernoulli(jax.random.key(7), 0.3, (B, K * g, t, s))
    # queries at the end of each sequence's cache, as in a decode step
    lengths = jnp.array([s, s - 20], jnp.int32)
    _compare(q, k, v, do, mask=mask, q_offset=lengths - t, kv_lengths=lengths)


def test_segments_softcap_scale_scalar_offset():
    B, T, S, K, g = 2, 2, 90, 2, 4
    q, k, v, do = _inputs(B, T, S, K * g, K, 64, 32, seed=5)
    seg_q = jnp.array([[0, 1], [1, 1]], jnp.int32)
    seg_k = jnp.array([[0] * 50 + [1] * 40, [0] * 30 + [1] * 60], jnp.int32)
    kw = dict(mask=masks.Causal(), segment_ids=(seg_q, seg_k), q_offset=70, scale=0.2)
    _compare(q, k, v, do, logits_soft_cap=3.0, kv_lengths=jnp.array([90, 85]), **kw)
    _compare(q, k, v, do, **kw)  # no kv_lengths: every block up to S


def test_shared_keys_and_values_as_absorbed_mla():
    """v is the very same array as k (MLA's latent rows): one operand, gradients summed."""
    B, T, S, N = 3, 1, 77, 8
    q, k, _, do = _inputs(B, T, S, N, 1, 40, 40, seed=9)
    lengths = jnp.array([77, 5, 40], jnp.int32)
    _compare(
        q, k, k, do, shared_kv=True, mask=masks.Causal(), q_offset=lengths - 1, kv_lengths=lengths
    )


def test_short_key_axis_and_one_block():
    q, k, v, do = _inputs(2, 1, 9, 4, 2, 16, 16, seed=3)  # S < block_kv: one block of S keys
    _compare(q, k, v, do, kv_lengths=jnp.array([9, 4]))


def test_fully_masked_rows_give_zeros_and_zero_grads():
    B, T, S, K, g = 2, 2, 40, 2, 2
    q, k, v, do = _inputs(B, T, S, K * g, K, 32, 32, seed=8)
    kw = dict(
        mask=masks.SlidingWindow(left=3, right=0),
        q_offset=20,
        kv_lengths=jnp.array([40, 0]),  # the second sequence sees no key at all
        segment_ids=(jnp.array([[9, 0], [0, 0]], jnp.int32), jnp.zeros((B, S), jnp.int32)),
    )
    o, lse, (dq, dk, dv) = _compare(q, k, v, do, **kw)
    for x in (o, lse, dq, dk, dv):
        assert not np.isnan(np.asarray(x)).any()
    assert (np.asarray(o[1]) == 0).all() and (np.asarray(o[0, 0]) == 0).all()
    assert np.isneginf(np.asarray(lse[1])).all() and np.isneginf(np.asarray(lse[0, :, 0])).all()
    assert (np.asarray(dq[1]) == 0).all() and (np.asarray(dk[1]) == 0).all()


def test_bf16_accumulates_in_fp32():
    q, k, v, _ = _inputs(2, 1, 100, 8, 2, 64, 64, dtype=jnp.bfloat16, seed=4)
    kw = dict(mask=masks.Causal(), q_offset=jnp.array([99, 60]), kv_lengths=jnp.array([100, 61]))
    want = attention(q, k, v, implementation="xla", **kw)
    got = attention(q, k, v, implementation="decode", block_sizes=BLOCKS, **kw)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2
    )


def test_unused_capacity_and_window_blocks_are_skipped():
    """Only kv blocks below max(kv_lengths) and inside the window are visited."""
    q, k, v, _ = _inputs(2, 1, 160, 4, 2, 16, 16)
    lengths = jnp.array([40, 70], jnp.int32)
    a = check_args(
        q,
        k,
        v,
        mask=masks.SlidingWindow(left=20),
        scale=None,
        logits_soft_cap=None,
        segment_ids=None,
        q_offset=lengths - 1,
        kv_lengths=lengths,
    )
    cnt = tables_for(a, 1, 16).count
    # window keys 19..69 over both sequences: blocks 1..4 of 16 keys
    assert int(cnt[0, 0, 0]) == 4


def test_auto_picks_decode_for_few_queries():
    q, k, v, _ = _inputs(1, 1, 1000, 4, 2, 16, 16)
    args = lambda q: check_args(
        q,
        k,
        v,
        mask=None,
        scale=None,
        logits_soft_cap=None,
        segment_ids=None,
        q_offset=None,
        kv_lengths=None,
    )
    if jax.default_backend() == "cpu":
        assert _choose(args(q), q, k, v, False, None) == "decode"
        q_long = jnp.zeros((1, 300, 4, 16))
        assert _choose(args(q_long), q_long, k, v, False, None) == "chunked"
    with pytest.raises(ValueError, match="DecodeBlockSizes"):
        attention(q, k, v, implementation="decode", block_sizes=object())


def test_block_sizes_fill_block_bytes():
    bs = DecodeBlockSizes()
    assert bs.keys_per_block(4, 8, 128, 4) == 128  # GQA fp32: 16 KiB per key, 2 MiB blocks
    assert bs.keys_per_block(4, 1, 576, 4) == 128  # absorbed MLA: 9 KiB per key
    assert bs.keys_per_block(64, 32, 256, 4) == 16  # never below 16 keys
    assert DecodeBlockSizes(block_kv=48).keys_per_block(4, 8, 128, 4) == 48
    with pytest.raises(ValueError, match="block_bytes"):
        DecodeBlockSizes(block_bytes=0)
