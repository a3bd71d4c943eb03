"""Mask specs: elementwise semantics from DESIGN.md, and the block views checked by brute force."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn import masks


def _brute(spec, q_len, kv_len, q_offset=0):
    return np.asarray(masks.materialize(spec, q_len, kv_len, q_offset))


def test_semantics_match_design_formulas():
    p = np.arange(40)[:, None] + 5
    j = np.arange(60)[None, :]
    cases = {
        masks.Causal(): j <= p,
        masks.SlidingWindow(left=3, right=2): (p - 3 <= j) & (j <= p + 2),
        masks.SinkWindow(sinks=4, window=6): (j <= p) & ((j < 4) | (p - j < 6)),
        masks.ChunkedCausal(chunk=7): (j <= p) & (j // 7 == p // 7),
        masks.Full(): np.ones((40, 60), bool),
    }
    for spec, want in cases.items():
        np.testing.assert_array_equal(_brute(spec, 40, 60, 5), want, err_msg=repr(spec))


def test_block_sparse_layout_and_combinators():
    layout = np.array([[1, 0, 1], [0, 1, 0]], bool)
    spec = masks.BlockSparse(layout=layout, block_q=4, block_kv=5)
    got = _brute(spec, 10, 17)  # rows 8-9 and keys 15-16 are outside the layout: masked
    want = np.zeros((10, 17), bool)
    want[:8, :15] = np.kron(layout, np.ones((4, 5), bool))
    np.testing.assert_array_equal(got, want)
    both = _brute(spec & masks.Causal(), 10, 17)
    np.testing.assert_array_equal(both, want & np.tri(10, 17, dtype=bool))
    either = _brute(spec | masks.Causal(), 10, 17)
    np.testing.assert_array_equal(either, want | np.tri(10, 17, dtype=bool))
    assert hash(spec) == hash(masks.BlockSparse(layout=layout.copy(), block_q=4, block_kv=5))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: masks.SlidingWindow(left=-1), "SlidingWindow.left"),
        (lambda: masks.SlidingWindow(left=2, right=-3), "SlidingWindow.right"),
        (lambda: masks.SinkWindow(sinks=2, window=0), "SinkWindow.window"),
        (lambda: masks.SinkWindow(sinks=-1, window=4), "SinkWindow.sinks"),
        (lambda: masks.ChunkedCausal(chunk=0), "ChunkedCausal.chunk"),
        (lambda: masks.BlockSparse(layout=np.ones(3, bool), block_q=2, block_kv=2), "layout"),
        (lambda: masks.BlockSparse(layout=np.ones((2, 2)), block_q=2, block_kv=2), "layout"),
        (lambda: masks.BlockSparse(layout=np.ones((2, 2), bool), block_q=0, block_kv=2), "block_q"),
        (lambda: masks.Causal() & np.ones((2, 2), bool), "right operand of &"),
        (lambda: masks.SlidingWindow(left=2.5), "SlidingWindow.left"),
    ],
)
def test_bad_specs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


_specs = st.one_of(
    st.just(masks.Causal()),
    st.just(masks.Full()),
    st.builds(
        lambda l, r: masks.SlidingWindow(left=l, right=r), st.integers(0, 12), st.integers(0, 6)
    ),
    st.builds(
        lambda s, w: masks.SinkWindow(sinks=s, window=w), st.integers(0, 5), st.integers(1, 12)
    ),
    st.builds(lambda c: masks.ChunkedCausal(chunk=c), st.integers(1, 9)),
    st.builds(
        lambda seed, bq, bk: masks.BlockSparse(
            layout=np.random.default_rng(seed).random((6, 6)) < 0.5, block_q=bq, block_kv=bk
        ),
        st.integers(0, 10**6),
        st.integers(1, 6),
        st.integers(1, 6),
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.one_of(
        _specs,
        st.builds(lambda a, b: a & b, _specs, _specs),
        st.builds(lambda a, b: a | b, _specs, _specs),
    ),
    q_lo=st.integers(0, 25),
    q_len=st.integers(1, 8),
    k_lo=st.integers(0, 25),
    k_len=st.integers(1, 8),
)
def test_block_views_are_conservative(spec, q_lo, q_len, k_lo, k_len):
    q_pos = np.arange(q_lo, q_lo + q_len)[:, None]
    k_pos = np.arange(k_lo, k_lo + k_len)[None, :]
    dense = np.asarray(spec(jnp.asarray(q_pos), jnp.asarray(k_pos)))
    block = (q_lo, q_lo + q_len - 1, k_lo, k_lo + k_len - 1)
    vis = bool(spec.block_visible(*map(jnp.int32, block)))
    full = bool(spec.block_full(*map(jnp.int32, block)))
    if dense.any():
        assert vis, "block_visible must never rule out a block with a visible pair"
    if full:
        assert dense.all(), "block_full must never claim a block with a masked pair"
