"""jaxattn.dot_product_attention: "chunked" against the "xla" reference and jax.nn.

Every mask kind × GQA group sizes 1, 2, 4, 8, with head dims 64, 128 and 192-qk/128-v and
lengths that are and are not block multiples, comparing outputs, LSE and gradients of q, k, v.
Calls whose query or key axis fits in one block (no loop over that axis) are checked the same
way: both axes, queries only and keys only.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import dot_product_attention as attention
from jaxattn import masks
from jaxattn.ops.attention_chunked import ChunkedBlockSizes

BLOCKS = ChunkedBlockSizes(block_q=32, block_kv=48)
TOL = dict(atol=2e-5, rtol=2e-5)
# compile time dominates these small cases: skip XLA's expensive optimisation passes
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _inputs(B, T, S, N, K, H, V, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, S, K, H), dtype)
    v = jax.random.normal(kv, (B, S, K, V), dtype)
    do = jax.random.normal(kd, (B, T, N, V), jnp.float32)
    return q, k, v, do


def _value_and_grads(impl, q, k, v, do, jit=True, **kw):
    """(o, lse) and the gradients of <o, do> + sum(lse_finite) for q, k, v (jitted: one compile)."""

    def f(q, k, v):
        o, lse = attention(q, k, v, implementation=impl, return_lse=True, **kw)
        lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0).sum()
        return (o.astype(jnp.float32) * do).sum() + 0.5 * lse_term, (o, lse)

    vg = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    if jit:
        vg = jax.jit(vg).lower(q, k, v).compile(compiler_options=FAST_COMPILE)
    (_, (o, lse)), grads = vg(q, k, v)
    return o, lse, grads


def _assert_close(got, want, tol=TOL, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, err_msg=what, **tol)


def _compare(q, k, v, do, tol=TOL, jit=True, **kw):
    run = lambda impl: _value_and_grads(impl, q, k, v, do, jit=jit, **kw)
    want, got = run("xla"), run("chunked")
    for name, g, w in zip(("o", "lse"), got[:2], want[:2]):
        _assert_close(g, w, tol, name)
    for name, g, w in zip(("dq", "dk", "dv"), got[2], want[2]):
        _assert_close(g, w, tol, name)
    return got


MASKS = {
    "none": None,
    "full": masks.Full(),
    "causal": masks.Causal(),
    "window": masks.SlidingWindow(left=17, right=0),
    "window2sided": masks.SlidingWindow(left=9, right=13),
    "sink": masks.SinkWindow(sinks=3, window=20),
    "chunkedcausal": masks.ChunkedCausal(chunk=40),
    "blocksparse": masks.BlockSparse(
        layout=np.random.default_rng(1).random((6, 6)) < 0.5, block_q=20, block_kv=25
    ),
    "and": masks.Causal() & masks.SlidingWindow(left=30, right=30),
    "or": masks.ChunkedCausal(chunk=32) | masks.SinkWindow(sinks=2, window=8),
    "dense": "dense",
}
HEAD_DIMS = [(64, 64), (128, 128), (192, 128)]
LENGTHS = [96, 111]  # 96 = 3 query blocks of 32 and 2 kv blocks of 48; 111 is neither
CASES = [
    (mname, g, HEAD_DIMS[i % 3], LENGTHS[(i // 3) % 2])
    for i, (mname, g) in enumerate(itertools.product(MASKS, (1, 2, 4, 8)))
]


@pytest.mark.parametrize(
    "mname, g, hv, t", CASES, ids=[f"{m}_g{g}_h{h}v{v}_t{t}" for m, g, (h, v), t in CASES]
)
def test_chunked_matches_reference(mname, g, hv, t):
    H, V = hv
    K = 2 if g <= 2 else 1
    q, k, v, do = _inputs(1, t, t, K * g, K, H, V, seed=g)
    mask = MASKS[mname]
    if mask == "dense":
        mask = jax.random.bernoulli(jax.random.key(7), 0.3, (1, K * g, t, t))
    _compare(q, k, v, do, mask=mask, block_sizes=BLOCKS)


@pytest.mark.parametrize("mname", ["none", "causal", "window", "dense"])
@pytest.mark.parametrize("g", [1, 4])
def test_matches_jax_nn(mname, g):
    """Against jax.nn.dot_product_attention wherever it supports the case (H == V)."""
    B, T, K, H = 2, 77, 2, 64
    q, k, v, _ = _inputs(B, T, T, K * g, K, H, H, seed=3)
    kw, mask = {}, MASKS[mname]
    if mname == "causal":
        kw = dict(is_causal=True)
    elif mname == "window":
        kw = dict(local_window_size=(17, 0))
    elif mname == "dense":
        mask = jax.random.bernoulli(jax.random.key(2), 0.5, (B, K * g, T, T))
        mask = mask.at[..., 0].set(True)  # jax.nn is not defined on rows that see no key
        kw = dict(mask=mask)
    want = jax.nn.dot_product_attention(q, k, v, **kw)
    for impl in ("xla", "chunked"):
        got = attention(
            q,
            k,
            v,
            mask=mask,
            implementation=impl,
            block_sizes=(BLOCKS if impl == "chunked" else None),
        )
        _assert_close(got, want, what=impl)


def test_matches_jax_nn_kv_lengths():
    q, k, v, _ = _inputs(3, 50, 70, 8, 2, 64, 64, seed=4)
    lens = jnp.array([70, 13, 41], jnp.int32)
    want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lens)
    for impl in ("xla", "chunked"):
        got = attention(q, k, v, kv_lengths=lens, implementation=impl, block_sizes=BLOCKS)
        _assert_close(got, want, what=impl)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_segments_offsets_lengths_softcap(jit):
    B, T, S, K, g = 2, 40, 100, 2, 4
    q, k, v, do = _inputs(B, T, S, K * g, K, 64, 32, seed=5)
    seg_q = jnp.array([[0] * 20 + [1] * 20, [1] * 40], jnp.int32)
    seg_k = jnp.array([[0] * 50 + [1] * 50, [0] * 30 + [1] * 70], jnp.int32)
    _compare(
        q,
        k,
        v,
        do,
        jit=jit,
        mask=masks.Causal(),
        segment_ids=(seg_q, seg_k),
        q_offset=60,
        kv_lengths=jnp.array([100, 85]),
        logits_soft_cap=5.0,
        block_sizes=BLOCKS,
    )
    # a traced per-sequence offset, as in ragged decoding
    _compare(
        q,
        k,
        v,
        do,
        jit=jit,
        mask=masks.SlidingWindow(left=25),
        q_offset=jnp.array([60, 10], jnp.int32),
        block_sizes=BLOCKS,
    )


def test_single_segment_array_and_scale():
    q, k, v, do = _inputs(2, 64, 64, 4, 4, 32, 32, seed=6)
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32)[None], 16, axis=1).reshape(1, 64)
    seg = jnp.concatenate([seg, jnp.sort(seg[:, ::-1], axis=1)])
    _compare(q, k, v, do, segment_ids=seg, scale=0.3, block_sizes=BLOCKS)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    B, T, S, K, g = 2, 50, 60, 2, 2
    q, k, v, do = _inputs(B, T, S, K * g, K, 64, 64, seed=8)
    kw = dict(
        mask=masks.SlidingWindow(left=5, right=0),
        q_offset=0,
        kv_lengths=jnp.array([60, 0]),  # the second sequence sees no key at all
        segment_ids=(jnp.zeros((B, T), jnp.int32).at[0, :10].set(9), jnp.zeros((B, S), jnp.int32)),
    )
    for impl in ("xla", "chunked"):
        o, lse, (dq, dk, dv) = _value_and_grads(
            impl, q, k, v, do, block_sizes=(BLOCKS if impl == "chunked" else None), **kw
        )
        for x in (o, lse, dq, dk, dv):
            assert not np.isnan(np.asarray(x)).any(), impl
        assert (np.asarray(o[1]) == 0).all() and (np.asarray(o[0, :10]) == 0).all()
        assert (
            np.isneginf(np.asarray(lse[1])).all() and np.isneginf(np.asarray(lse[0, :, :10])).all()
        )
        assert (np.asarray(dq[1]) == 0).all() and (np.asarray(dk[1]) == 0).all()
        assert (np.asarray(dv[1]) == 0).all() and (np.asarray(dq[0, :10]) == 0).all()


@pytest.mark.parametrize("blocks", [BLOCKS, None], ids=["blocks", "one_block"])
@pytest.mark.parametrize("hv", [(64, 64), (192, 128)])
def test_bf16_accumulates_in_fp32(hv, blocks):
    H, V = hv
    q, k, v, do = _inputs(1, 130, 130, 8, 2, H, V, dtype=jnp.bfloat16, seed=9)
    want = _value_and_grads(
        "xla", *(x.astype(jnp.float32) for x in (q, k, v)), do, mask=masks.Causal()
    )
    got = _value_and_grads("chunked", q, k, v, do, mask=masks.Causal(), block_sizes=blocks)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    # bf16 inputs and outputs: ~3 significant digits; fp32 softmax and accumulation
    tol = dict(atol=3e-2, rtol=3e-2)
    for g, w in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        _assert_close(g, w, tol)


# Calls with one block along an axis: (T, S, block sizes) giving nq = nk = 1 (the block
# shrinks to T and S: no padding), nq = 1 with 3 kv blocks (S padded 100 -> 144) and 3 q blocks
# (T padded 100 -> 144) with nk = 1.
ONE_BLOCK = {
    "one": (40, 64, ChunkedBlockSizes(block_q=64, block_kv=64)),
    "q1": (40, 100, ChunkedBlockSizes(block_q=64, block_kv=48)),
    "k1": (100, 40, ChunkedBlockSizes(block_q=48, block_kv=64)),
}
ONE_BLOCK_MASKS = ["none", "causal", "window2sided", "sink", "blocksparse", "and", "or", "dense"]
ONE_BLOCK_CASES = [
    (layout, mname, (1, 2, 4, 8)[i % 4], ((48, 32), *HEAD_DIMS)[i % 4])
    for i, (layout, mname) in enumerate(itertools.product(ONE_BLOCK, ONE_BLOCK_MASKS))
]


@pytest.mark.parametrize(
    "layout, mname, g, hv",
    ONE_BLOCK_CASES,
    ids=[f"{lay}_{m}_g{g}_h{h}v{v}" for lay, m, g, (h, v) in ONE_BLOCK_CASES],
)
def test_one_block_matches_reference(layout, mname, g, hv):
    T, S, blocks = ONE_BLOCK[layout]
    H, V = hv
    K = 2 if g <= 2 else 1
    q, k, v, do = _inputs(2, T, S, K * g, K, H, V, seed=20 + g)
    mask = MASKS[mname]
    if mask == "dense":
        mask = jax.random.bernoulli(jax.random.key(7), 0.3, (2, K * g, T, S))
    # queries at the end of the key axis when T < S (prefill against a longer cache)
    _compare(q, k, v, do, mask=mask, q_offset=max(S - T, 0), block_sizes=blocks)


@pytest.mark.parametrize("layout", ONE_BLOCK)
def test_one_block_segments_offsets_lengths_softcap(layout):
    T, S, blocks = ONE_BLOCK[layout]
    B, K, g = 2, 2, 4
    q, k, v, do = _inputs(B, T, S, K * g, K, 64, 32, seed=21)
    seg_q = jnp.zeros((B, T), jnp.int32).at[0, T // 2 :].set(1).at[1].set(1)
    seg_k = jnp.zeros((B, S), jnp.int32).at[0, S // 2 :].set(1).at[1, S // 3 :].set(1)
    common = dict(logits_soft_cap=5.0, kv_lengths=jnp.array([S, S - 7]), block_sizes=blocks)
    _compare(q, k, v, do, mask=masks.Causal(), segment_ids=(seg_q, seg_k), q_offset=S, **common)
    # traced offsets: one for the batch, then one per sequence
    _compare(q, k, v, do, mask=masks.Causal(), q_offset=jnp.int32(3), **common)
    offsets = jnp.array([S // 2, 0], jnp.int32)
    _compare(q, k, v, do, mask=masks.SlidingWindow(left=25), q_offset=offsets, **common)


@pytest.mark.parametrize("layout", ONE_BLOCK)
def test_one_block_fully_masked_rows_and_blocks(layout):
    """Rows that see no key, and blocks the table would skip, give zeros and zero gradients.

    With one kv block the block is never skipped: it runs with every key masked instead.
    """
    T, S, blocks = ONE_BLOCK[layout]
    B, K, g = 2, 2, 2
    q, k, v, do = _inputs(B, T, S, K * g, K, 64, 64, seed=22)
    cases = {
        # the second sequence sees no key; rows 0..9 of the first are in a segment of their own
        "rows": dict(
            mask=masks.SlidingWindow(left=5, right=0),
            kv_lengths=jnp.array([S, 0]),
            segment_ids=(
                jnp.zeros((B, T), jnp.int32).at[0, :10].set(9),
                jnp.zeros((B, S), jnp.int32),
            ),
        ),
        # rows at positions >= S + 5 see no key: for "k1", q blocks 1 and 2 see none
        "window": dict(mask=masks.SlidingWindow(left=5, right=0), q_offset=max(S - T // 2 + 5, 0)),
        # no key at all: every block is invisible
        "none": dict(kv_lengths=jnp.zeros((B,), jnp.int32)),
    }
    for name, kw in cases.items():
        o, lse, (dq, dk, dv) = _compare(q, k, v, do, block_sizes=blocks, **kw)
        for x in (o, lse, dq, dk, dv):
            assert not np.isnan(np.asarray(x)).any(), name
        dead = np.isneginf(np.asarray(lse))  # [B, N, T]
        assert dead.any(), name
        dead_bt = dead.transpose(0, 2, 1)[..., None]  # [B, T, N, 1]
        assert (np.where(dead_bt, np.asarray(o), 0) == 0).all(), name
        assert (np.where(dead_bt, np.asarray(dq), 0) == 0).all(), name
        if name == "none":
            assert (np.asarray(dk) == 0).all() and (np.asarray(dv) == 0).all()


def test_one_block_builds_no_loop_or_branch():
    """nq = nk = 1: no lax.map/scan, fori_loop or lax.cond in the forward or the backward."""
    q, k, v, do = _inputs(2, 40, 64, 8, 2, 48, 32)

    def loss(q, k, v):
        o = attention(
            q,
            k,
            v,
            mask=masks.Causal(),
            q_offset=24,
            kv_lengths=jnp.array([64, 30]),
            implementation="chunked",
        )
        return (o * do).sum()

    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    for primitive in ("while", "scan", "cond"):
        assert f" {primitive}[" not in text, primitive
    # with several kv blocks, the loop is still there
    loss_blocks = lambda q, k, v: attention(
        q, k, v, implementation="chunked", block_sizes=ChunkedBlockSizes(block_kv=16)
    ).sum()
    assert " while[" in str(jax.make_jaxpr(loss_blocks)(q, k, v))


def test_causal_skips_the_upper_triangle():
    from jaxattn.ops._attention_args import check_args
    from jaxattn.ops.attention_chunked import tables_for
    from pallas_kernels.block_tables import FULL_BIT

    q, k, v, _ = _inputs(1, 1024, 1024, 2, 2, 8, 8)
    common = dict(
        scale=None, logits_soft_cap=None, segment_ids=None, q_offset=None, kv_lengths=None
    )
    n = 8

    def visits(mask):
        t = tables_for(check_args(q, k, v, mask=mask, **common), 128, 128)
        cnt = np.asarray(t.count)[0, 0]
        flags = np.asarray(t.flags)[0, 0]
        full = sum(int(((flags[r, :c] & FULL_BIT) != 0).sum()) for r, c in enumerate(cnt))
        return int(cnt.sum()), full

    assert visits(masks.Causal()) == (n * (n + 1) // 2, n * (n - 1) // 2)
    # O(T·window): the diagonal and one block before it
    assert visits(masks.SlidingWindow(left=127))[0] == 2 * n - 1
    assert visits(None)[0] == n * n


def test_auto_and_named_implementations():
    from jaxattn.ops._attention_args import check_args
    from jaxattn.ops.attention import _choose

    q, k, v, _ = _inputs(1, 40, 40, 4, 2, 16, 16)
    ref = attention(q, k, v, mask=masks.Causal(), implementation="xla")
    _assert_close(attention(q, k, v, mask=masks.Causal()), ref)
    if jax.default_backend() == "cpu":  # one block: "chunked" without its loops
        none = dict.fromkeys(("scale", "logits_soft_cap", "segment_ids", "q_offset", "kv_lengths"))
        a = check_args(q, k, v, mask=masks.Causal(), **none)
        assert _choose(a, q, k, v, False, None) == "chunked"
    for impl in ("pallas_tpu", "pallas_gpu", "cudnn"):
        with pytest.raises(NotImplementedError, match=impl):
            attention(q, k, v, implementation=impl)
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, implementation="flash")


def _bad(**over):
    B, T, S, N, K, H = 2, 8, 10, 4, 2, 16
    args = dict(q=jnp.zeros((B, T, N, H)), k=jnp.zeros((B, S, K, H)), v=jnp.zeros((B, S, K, H)))
    args.update({k: v for k, v in over.items() if k in args})
    kw = {k: v for k, v in over.items() if k not in args}
    return lambda: attention(args["q"], args["k"], args["v"], **kw)


@pytest.mark.parametrize(
    "call, match",
    [
        (_bad(k=jnp.zeros((2, 10, 3, 16)), v=jnp.zeros((2, 10, 3, 16))), "multiple of kv heads"),
        (_bad(q=jnp.zeros((2, 8, 16))), "q must have rank 4"),
        (_bad(v=jnp.zeros((2, 10, 2))), "v must have rank 4"),
        (_bad(k=jnp.zeros((2, 10, 2, 16), jnp.bfloat16)), "share a dtype"),
        (_bad(q=jnp.zeros((2, 8, 4, 12))), "head dim"),
        (_bad(k=jnp.zeros((3, 10, 2, 16))), "batch"),
        (_bad(v=jnp.zeros((2, 11, 2, 16))), "agree on seq"),
        (_bad(q=jnp.zeros((2, 8, 4, 16), jnp.int32)), "q must be a floating"),
        (_bad(mask=jnp.ones((8, 9), bool)), "mask array must have shape"),
        (_bad(mask=jnp.ones((8, 10), jnp.float32)), "mask array must be bool"),
        (_bad(mask="causal"), "mask must be"),
        (_bad(segment_ids=jnp.zeros((2, 8), jnp.int32)), "single segment_ids array needs T == S"),
        (
            _bad(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 9), jnp.int32))),
            r"segment_ids \(kv side\)",
        ),
        (
            _bad(segment_ids=(jnp.zeros((2, 8)), jnp.zeros((2, 10), jnp.int32))),
            r"segment_ids \(query side\) must be an integer",
        ),
        (_bad(kv_lengths=jnp.zeros((3,), jnp.int32)), "kv_lengths must have shape"),
        (_bad(q_offset=-1), "q_offset"),
        (_bad(q_offset=jnp.zeros((2, 2), jnp.int32)), "q_offset"),
        (_bad(scale=0.0), "scale"),
        (_bad(logits_soft_cap=-1.0), "logits_soft_cap"),
        (_bad(implementation="chunked", block_sizes=(8, 8)), "block_sizes"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_negative_window_is_rejected_at_construction():
    with pytest.raises(ValueError, match="SlidingWindow.left"):
        masks.SlidingWindow(left=-2)


def test_pallas_tpu_through_the_op_in_interpret_mode():
    """The op hands every argument to the TPU kernel (run here by TPU interpret mode)."""
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.flash_attention import BlockSizes

    q, k, v, do = _inputs(2, 40, 56, 4, 2, 64, 32, seed=11)
    kw = dict(
        mask=masks.Causal(),
        q_offset=16,
        kv_lengths=jnp.array([56, 30]),
        segment_ids=(jnp.zeros((2, 40), jnp.int32), jnp.zeros((2, 56), jnp.int32)),
        logits_soft_cap=20.0,
    )
    want = _value_and_grads("xla", q, k, v, do, **kw)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        got = _value_and_grads(
            "pallas_tpu",
            q,
            k,
            v,
            do,
            jit=False,
            block_sizes=BlockSizes(block_q=16, block_kv=16, block_q_bwd=16, block_kv_bwd=16),
            **kw,
        )
        with pytest.raises(NotImplementedError, match="dense mask"):
            attention(q, k, v, mask=jnp.ones((40, 56), bool), implementation="pallas_tpu")
    for name, g, w in zip(
        ("o", "lse", "dq", "dk", "dv"), (*got[:2], *got[2]), (*want[:2], *want[2])
    ):
        _assert_close(g, w, dict(atol=1e-4, rtol=1e-4), name)
