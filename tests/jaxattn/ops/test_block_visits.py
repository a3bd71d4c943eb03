"""Block-visit lists (``block_visits=`` / dynamic ``BlockSparse``) in the "xla", "chunked" and
"decode" implementations: outputs, LSE and gradients against jax.nn.dot_product_attention under
the equivalent dense mask and against each other, over fuzzed lists (empty, full, unsorted,
duplicated rows; shared or per batch row and kv head), awkward lengths and GQA groups 1-8;
"chunked" reads only listed blocks; bad lists raise ValueError naming the argument.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from visit_case import (
    assert_close,
    check_jax_nn,
    compile_value_and_grads,
    dense_from_visits,
    fast_jit,
    inputs,
    jax_nn_case,
    op,
    random_visits,
    value_and_grads_many,
)

from jaxattn import dot_product_attention as attention
from jaxattn import masks
from jaxattn.ops import ChunkedBlockSizes, DecodeBlockSizes
from jaxattn.ops._attention_args import check_args
from jaxattn.ops.attention_chunked import tables_for

TOL = dict(atol=5e-5, rtol=5e-5)


def _spec_dense(spec, T, S, q_offset=0):
    return np.asarray(masks.materialize(spec, T, S, q_offset)) if spec is not None else True


def _compare_impls(q, k, v, do, impls=("chunked",), dense=None, **kw):
    """Each implementation against "xla" (o, lse, dq, dk, dv) and, given the dense mask,
    "chunked" against jax.nn under it: one compiled call for the whole case."""
    cases = [(op(i, return_lse=True, **kw), do) for i in ("xla", *impls)]
    if dense is not None:
        cases += jax_nn_case(op("chunked", **kw), do, dense)
    fns, dos = zip(*cases)
    want, *got = value_and_grads_many(fns, q, k, v, dos)
    if dense is not None:
        check_jax_nn(*got[-2:], dense, TOL)
        got = got[:-2]
    for impl, g_i in zip(impls, got):
        for name, g, w in zip(("o", "lse"), g_i[:2], want[:2]):
            assert_close(g, w, TOL, f"{impl} {name}")
        for name, g, w in zip(("dq", "dk", "dv"), g_i[2], want[2]):
            assert_close(g, w, TOL, f"{impl} {name}")
    return want


CHUNKED_FUZZ = dict(
    B=st.integers(1, 2),
    T=st.integers(1, 70),
    S=st.integers(1, 70),
    K=st.integers(1, 2),
    G=st.sampled_from([1, 2, 3, 4, 8]),
    block_q=st.integers(1, 24),
    block_kv=st.integers(1, 24),
    per_row=st.booleans(),
    per_head=st.booleans(),
    spec=st.sampled_from(["none", "causal", "window"]),
    lengths=st.booleans(),
    seed=st.integers(0, 2**16),
)


def _fuzz_settings(n):
    """n drawn examples; n = 0: only the explicit @example cases (the default run's)."""
    return settings(
        max_examples=max(n, 1),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
        phases=(Phase.explicit,) if n == 0 else tuple(Phase),
    )


def _fuzz_chunked(B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, lengths, seed):
    rng = np.random.default_rng(seed)
    N, H = K * G, 16
    nk = -(-S // block_kv)
    visits = random_visits(
        rng,
        Bv=B if per_row else 1,
        Kv=K if per_head else 1,
        T=T,
        S=S,
        block_q=block_q,
        block_kv=block_kv,
        L=int(rng.integers(1, nk + 3)),
    )
    mask = {"none": None, "causal": masks.Causal(), "window": masks.SlidingWindow(left=9)}[spec]
    q_offset = max(S - T, 0)
    kv_lengths = jnp.asarray(rng.integers(0, S + 1, B), jnp.int32) if lengths else None
    q, k, v, do = inputs(seed, B, T, S, N, K, H, H)  # jax.nn needs V == H
    kw = dict(mask=mask, q_offset=q_offset, kv_lengths=kv_lengths, block_visits=visits)
    dense = dense_from_visits(visits, B=B, N=N, K=K, T=T, S=S) & _spec_dense(mask, T, S, q_offset)
    if kv_lengths is not None:
        dense = dense & (np.arange(S) < np.asarray(kv_lengths)[:, None, None, None])
    _compare_impls(q, k, v, do, dense=dense, **kw)


# the default run: three fixed awkward cases (lengths off every block and unequal, per-row and
# per-head lists, GQA 8, 3 and 1, the three specs, with and without kv_lengths); the drawn
# sweep below is the slow tier
@_fuzz_settings(0)
@given(**CHUNKED_FUZZ)
@example(
    B=2,
    T=70,
    S=53,
    K=2,
    G=8,
    block_q=24,
    block_kv=7,
    per_row=True,
    per_head=True,
    spec="causal",
    lengths=True,
    seed=11,
)
@example(
    B=1,
    T=37,
    S=66,
    K=1,
    G=3,
    block_q=5,
    block_kv=16,
    per_row=False,
    per_head=True,
    spec="window",
    lengths=False,
    seed=12,
)
@example(
    B=2,
    T=1,
    S=41,
    K=2,
    G=1,
    block_q=1,
    block_kv=9,
    per_row=True,
    per_head=False,
    spec="none",
    lengths=True,
    seed=13,
)
def test_fuzz_visits_chunked_xla_and_jax_nn(
    B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, lengths, seed
):
    _fuzz_chunked(B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, lengths, seed)


@pytest.mark.slow  # drawn cases; test_fuzz_visits_chunked_xla_and_jax_nn keeps each class
@_fuzz_settings(16)
@given(**CHUNKED_FUZZ)
def test_fuzz_visits_chunked_sweep(
    B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, lengths, seed
):
    _fuzz_chunked(B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, lengths, seed)


@pytest.mark.parametrize("G", [1, 3, 8])
def test_gqa_segments_and_per_head_lists(G):
    """Per (batch row, kv head) lists with segment ids and a causal spec, T and S off blocks."""
    B, T, S, K = 2, 45, 53, 2
    rng = np.random.default_rng(G)
    visits = random_visits(rng, Bv=B, Kv=K, T=T, S=S, block_q=16, block_kv=8, L=5)
    q, k, v, do = inputs(G, B, T, S, K * G, K, 16, 16)
    seg_q = jnp.asarray(np.sort(rng.integers(0, 2, (B, T)), axis=1), jnp.int32)
    seg_k = jnp.asarray(np.sort(rng.integers(0, 2, (B, S)), axis=1), jnp.int32)
    kw = dict(mask=masks.Causal(), q_offset=S - T, segment_ids=(seg_q, seg_k), block_visits=visits)
    dense = dense_from_visits(visits, B=B, N=K * G, K=K, T=T, S=S)
    dense &= _spec_dense(masks.Causal(), T, S, S - T)
    dense &= (np.asarray(seg_q)[:, :, None] == np.asarray(seg_k)[:, None, :])[:, None]
    _compare_impls(q, k, v, do, dense=dense, **kw)


def test_chunked_reads_only_listed_blocks():
    """NaN in every unlisted block of k and v leaves "chunked" finite (it never reads them),
    equal to a clean run; the tables' trip counts are the deduplicated listed blocks."""
    B, T, S, K, N, bk = 2, 40, 96, 2, 4, 16
    idx = np.zeros((B, K, 2, 3), np.int32)
    idx[0, 0] = [[5, 1, 5], [0, 0, 0]]  # unsorted, a duplicate; row 1 padded
    idx[0, 1] = [[2, 3, 4], [2, 2, 2]]
    idx[1, 0] = [[0, 1, 2], [3, 3, 3]]
    idx[1, 1] = [[5, 5, 5], [4, 0, 1]]
    cnt = np.array([[[3, 0], [3, 1]], [[2, 1], [1, 3]]], np.int32)
    visits = masks.BlockVisits(
        indices=jnp.asarray(idx), counts=jnp.asarray(cnt), block_q=32, block_kv=bk
    )
    listed = dense_from_visits(visits, B=B, N=K, K=K, T=T, S=S).any(2)  # [B, K, S]
    q, k, v, do = inputs(0, B, T, S, N, K, 16, 16)
    keep = listed.transpose(0, 2, 1)[..., None]
    nan_k, nan_v = (jnp.asarray(np.where(keep, np.asarray(x), np.nan)) for x in (k, v))
    run = compile_value_and_grads(
        [op("chunked", return_lse=True, block_visits=visits)], q, k, v, [do]
    )
    (clean,), (poisoned,) = run(q, k, v, [do]), run(q, nan_k, nan_v, [do])
    for name, g, w in zip(
        ("o", "lse", "dq"), (*poisoned[:2], poisoned[2][0]), (*clean[:2], clean[2][0])
    ):
        assert_close(g, w, TOL, name)
    none = dict.fromkeys(("scale", "logits_soft_cap", "segment_ids", "q_offset", "kv_lengths"))
    check_args(q, k, v, mask=None, block_visits=visits, **none)  # the concrete lists are valid

    @jax.jit  # the table builder in one compile (eager, it is dozens of small ones)
    def count(q, k, v, idx, cnt):
        vis = masks.BlockVisits(indices=idx, counts=cnt, block_q=32, block_kv=bk)
        return tables_for(check_args(q, k, v, mask=None, block_visits=vis, **none), 32, bk).count

    counts = np.asarray(count(q, k, v, visits.indices, visits.counts))
    np.testing.assert_array_equal(counts, [[[2, 0], [3, 1]], [[2, 1], [1, 3]]])


def test_empty_lists_give_zeros_and_zero_gradients():
    B, T, S, K, N = 1, 20, 30, 1, 2
    visits = masks.BlockVisits(
        indices=jnp.zeros((1, 1, 2, 4), jnp.int32),
        counts=jnp.array([[[0, 2]]], jnp.int32),  # query block 0 lists nothing
        block_q=10,
        block_kv=10,
    )
    q, k, v, do = inputs(1, B, T, S, N, K, 16, 16)
    impls = ("xla", "chunked")
    fns = [op(impl, return_lse=True, block_visits=visits) for impl in impls]
    for impl, (o, lse, (dq, dk, dv)) in zip(impls, value_and_grads_many(fns, q, k, v, [do] * 2)):
        for x in (o, lse, dq, dk, dv):
            assert not np.isnan(np.asarray(x)).any(), impl
        assert (np.asarray(o)[:, :10] == 0).all() and np.isneginf(np.asarray(lse)[..., :10]).all()
        assert (np.asarray(dq)[:, :10] == 0).all()
    # "decode" has one query block of all 20 rows, spanning two list rows: it cannot serve this
    with pytest.raises(NotImplementedError, match="visit-list query block"):
        attention(q, k, v, block_visits=visits, implementation="decode")


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_decode_follows_the_lists(per_head):
    B, T, S, K, G = 2, 3, 77, 2, 4
    rng = np.random.default_rng(3)
    visits = random_visits(
        rng, Bv=B, Kv=K if per_head else 1, T=T, S=S, block_q=4, block_kv=16, L=4
    )
    q, k, v, do = inputs(2, B, T, S, K * G, K, 16, 8)
    lengths = jnp.array([77, 50], jnp.int32)
    kw = dict(mask=masks.Causal(), q_offset=lengths - T, kv_lengths=lengths, block_visits=visits)
    _compare_impls(q, k, v, do, impls=("decode", "chunked"), **kw)
    with pytest.raises(ValueError, match="must nest inside"):
        attention(q, k, v, implementation="decode", block_sizes=DecodeBlockSizes(block_kv=24), **kw)


def test_dynamic_block_sparse_inside_jit_per_row_and_head():
    """A layout computed inside jit, different per batch row and kv head, ANDed with Causal:
    the same as the visit lists (and the dense mask) it stands for."""
    B, T, S, K, G, bq, bk = 2, 50, 50, 2, 2, 10, 10
    q, k, v, do = inputs(4, B, T, S, K * G, K, 16, 16)
    scores = jnp.asarray(np.random.default_rng(9).random((B, K, 5, 5)), jnp.float32)

    @fast_jit
    def run(q, k, v, scores):
        layout = scores > 0.5  # traced: data-dependent block selection
        spec = masks.Causal() & masks.BlockSparse(layout=layout, block_q=bq, block_kv=bk)
        return attention(q, k, v, mask=spec, implementation="chunked")

    got = run(q, k, v, scores)
    layout = np.asarray(scores > 0.5)
    dense = np.repeat(np.kron(layout, np.ones((bq, bk), bool)), G, axis=1) & np.tri(
        T, S, dtype=bool
    )
    seen = dense.any(-1).transpose(0, 2, 1)[..., None]
    # a 2-D jax layout is the static numpy layout's twin
    lay2 = np.random.default_rng(0).random((5, 5)) < 0.5
    static = masks.BlockSparse(layout=lay2, block_q=bq, block_kv=bk)
    dynamic = masks.BlockSparse(layout=jnp.asarray(lay2), block_q=bq, block_kv=bk)

    @fast_jit  # the references and both layouts in one compile
    def references(q, k, v):
        want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(dense))
        twins = [attention(q, k, v, mask=dynamic, implementation=i) for i in ("xla", "chunked")]
        return want, twins, attention(q, k, v, mask=static, implementation="xla")

    want, twins, from_static = references(q, k, v)
    assert_close(np.where(seen, got, 0), np.where(seen, want, 0), TOL)
    for impl, twin in zip(("xla", "chunked"), twins):
        assert_close(twin, from_static, TOL, impl)


def _bad(**over):
    B, T, S, N, K, H = 2, 8, 10, 4, 2, 16
    q, k, v = jnp.zeros((B, T, N, H)), jnp.zeros((B, S, K, H)), jnp.zeros((B, S, K, H))
    fields = dict(
        indices=jnp.zeros((B, K, 2, 3), jnp.int32),
        counts=jnp.ones((B, K, 2), jnp.int32),
        block_q=4,
        block_kv=4,
    )
    kw = {f: over.pop(f) for f in list(over) if f in fields}
    visits = masks.BlockVisits(**{**fields, **kw})
    return lambda: attention(q, k, v, block_visits=visits, **over)


@pytest.mark.parametrize(
    "call, match",
    [
        (_bad(indices=jnp.full((2, 2, 2, 3), 3, jnp.int32)), r"block_visits.indices must lie"),
        (_bad(indices=jnp.full((2, 2, 2, 3), -1, jnp.int32)), r"block_visits.indices must lie"),
        (_bad(counts=jnp.full((2, 2, 2), 4, jnp.int32)), r"block_visits.counts must lie"),
        (_bad(counts=jnp.full((2, 2, 2), -1, jnp.int32)), r"block_visits.counts must lie"),
        (_bad(counts=jnp.ones((2, 2, 3), jnp.int32)), r"block_visits.counts must have shape"),
        (_bad(indices=jnp.zeros((2, 2, 3, 3), jnp.int32)), r"Q = ceil\(T / block_q\)"),
        (_bad(indices=jnp.zeros((3, 2, 2, 3), jnp.int32)), r"block_visits.indices must have"),
        (_bad(indices=jnp.zeros((2, 2, 3), jnp.int32)), r"block_visits.indices must have"),
        (_bad(indices=jnp.zeros((2, 2, 2, 3))), r"block_visits.indices must be an integer"),
        (_bad(counts=jnp.ones((2, 2, 2), bool)), r"block_visits.counts must be an integer"),
        (_bad(block_q=0), r"block_visits.block_q must be a positive int"),
        (
            _bad(implementation="chunked", block_sizes=ChunkedBlockSizes(block_q=3, block_kv=4)),
            "must nest inside",
        ),
    ],
)
def test_bad_visits_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_dynamic_block_sparse_raises():
    q = jnp.zeros((1, 8, 2, 16))
    layout = masks.BlockSparse(layout=jnp.ones((2, 2), bool), block_q=4, block_kv=4)
    with pytest.raises(ValueError, match="inside |"):
        attention(q, q, q, mask=masks.Causal() | layout)
    with pytest.raises(ValueError, match="multiple of block_q=4"):
        attention(q, q, q, mask=layout, q_offset=2)
    with pytest.raises(ValueError, match="no elementwise view"):
        masks.BlockSparse(layout=np.ones((1, 1, 2, 2), bool), block_q=4, block_kv=4)(0, 0)


def test_traced_lists_out_of_range_are_ignored():
    """Inside jit the values cannot be checked: out-of-range indices are dropped and counts
    clipped to [0, L], as documented."""
    q, k, v, _ = inputs(5, 1, 8, 16, 2, 1, 16, 16)

    @jax.jit
    def run(idx, cnt):
        visits = masks.BlockVisits(indices=idx, counts=cnt, block_q=8, block_kv=4)
        return attention(q, k, v, block_visits=visits, implementation="chunked")

    got = run(jnp.array([[[[1, 99, -3]]]], jnp.int32), jnp.array([[[7]]], jnp.int32))
    want = run(jnp.array([[[[1, 1, 1]]]], jnp.int32), jnp.array([[[1]]], jnp.int32))
    assert_close(got, want, TOL)


# -- the kv-major (Flash Sparse Attention) loop order ------------------------------------------

KV = ChunkedBlockSizes(loop_order="kv")


KV_FUZZ = dict(
    B=st.integers(1, 2),
    T=st.integers(1, 50),
    S=st.integers(1, 60),
    K=st.integers(1, 2),
    G=st.sampled_from([1, 2, 4, 8]),
    block_q=st.integers(1, 12),
    block_kv=st.integers(1, 16),
    per_row=st.booleans(),
    per_head=st.booleans(),
    spec=st.sampled_from(["none", "causal", "window"]),
    cap=st.booleans(),
    seed=st.integers(0, 2**16),
)


@_fuzz_settings(0)  # the fixed awkward cases only (GQA 2 and 8); the slow sweep draws 8
@given(**KV_FUZZ)
@example(
    B=2,
    T=45,
    S=59,
    K=2,
    G=2,
    block_q=7,
    block_kv=16,
    per_row=True,
    per_head=False,
    spec="causal",
    cap=True,
    seed=21,
)
@example(
    B=1,
    T=50,
    S=23,
    K=1,
    G=8,
    block_q=12,
    block_kv=5,
    per_row=False,
    per_head=True,
    spec="window",
    cap=False,
    seed=22,
)
def test_fuzz_kv_major_order_equals_xla(
    B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, cap, seed
):
    _fuzz_kv(B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, cap, seed)


@pytest.mark.slow  # drawn cases; test_fuzz_kv_major_order_equals_xla keeps each class
@_fuzz_settings(8)
@given(**KV_FUZZ)
def test_fuzz_kv_major_sweep(B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, cap, seed):
    _fuzz_kv(B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, cap, seed)


def _fuzz_kv(B, T, S, K, G, block_q, block_kv, per_row, per_head, spec, cap, seed):
    """loop_order="kv" (FSA order) == "xla" (o, lse, dq, dk, dv) over fuzzed lists, groups,
    masks, kv_lengths, q_offset and soft caps."""
    rng = np.random.default_rng(seed)
    nk = -(-S // block_kv)
    visits = random_visits(
        rng,
        Bv=B if per_row else 1,
        Kv=K if per_head else 1,
        T=T,
        S=S,
        block_q=block_q,
        block_kv=block_kv,
        L=int(rng.integers(1, nk + 3)),
    )
    mask = {"none": None, "causal": masks.Causal(), "window": masks.SlidingWindow(left=7)}[spec]
    q, k, v, do = inputs(seed, B, T, S, K * G, K, 16, 8)
    kw = dict(
        mask=mask,
        q_offset=max(S - T, 0),
        kv_lengths=jnp.asarray(rng.integers(0, S + 1, B), jnp.int32),
        logits_soft_cap=2.5 if cap else None,
        block_visits=visits,
    )
    want, got = value_and_grads_many(
        [op("xla", return_lse=True, **kw), op("chunked", return_lse=True, block_sizes=KV, **kw)],
        q,
        k,
        v,
        [do, do],
    )
    for name, g, w in zip(
        ("o", "lse", "dq", "dk", "dv"), (*got[:2], *got[2]), (*want[:2], *want[2])
    ):
        assert_close(g, w, TOL, name)


@pytest.mark.parametrize("G", [1, 4])
def test_kv_major_per_token_lists_with_segments(G):
    """Per-token lists (block_q = 1, the auto choice of the kv-major order) with segment ids,
    GQA groups 1 and 4 (NSA's tests add G = 2): equal to "xla" and to jax.nn under the dense
    mask."""
    B, T, S, K = 2, 33, 33, 2
    rng = np.random.default_rng(10 + G)
    visits = random_visits(rng, Bv=B, Kv=K, T=T, S=S, block_q=1, block_kv=8, L=3)
    q, k, v, do = inputs(G, B, T, S, K * G, K, 16, 16)
    seg = jnp.asarray(np.sort(rng.integers(0, 2, (B, T)), axis=1), jnp.int32)
    kw = dict(mask=masks.Causal(), segment_ids=seg, block_visits=visits)
    dense = dense_from_visits(visits, B=B, N=K * G, K=K, T=T, S=S) & np.tri(T, S, dtype=bool)
    dense &= (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :])[:, None]
    _compare_impls(q, k, v, do, dense=dense, **kw)  # "auto" order: kv-major for block_q = 1


def test_kv_major_reads_only_listed_blocks_and_refuses_what_it_cannot_serve():
    B, T, S, K, N = 1, 24, 64, 1, 2
    idx = np.array([[[[3, 0]] * 24]], np.int32)
    cnt = np.full((1, 1, 24), 2, np.int32)
    visits = masks.BlockVisits(
        indices=jnp.asarray(idx), counts=jnp.asarray(cnt), block_q=1, block_kv=16
    )
    q, k, v, do = inputs(3, B, T, S, N, K, 16, 16)
    listed = (np.arange(S) // 16 == 0) | (np.arange(S) // 16 == 3)
    poison = lambda x: jnp.asarray(np.where(listed[None, :, None, None], np.asarray(x), np.nan))
    fn = op("chunked", return_lse=True, block_visits=visits, block_sizes=KV)
    run = compile_value_and_grads([fn], q, k, v, [do])
    (clean,), (dirty,) = run(q, k, v, [do]), run(q, poison(k), poison(v), [do])
    for name, g, w in zip(("o", "lse", "dq"), (*dirty[:2], dirty[2][0]), (*clean[:2], clean[2][0])):
        assert_close(g, w, TOL, name)
    with pytest.raises(NotImplementedError, match="loop_order='kv'.*no dropout"):
        attention(
            q,
            k,
            v,
            block_visits=visits,
            block_sizes=KV,
            implementation="chunked",
            dropout_rate=0.1,
            dropout_rng=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="loop_order must be"):
        ChunkedBlockSizes(loop_order="rows")
