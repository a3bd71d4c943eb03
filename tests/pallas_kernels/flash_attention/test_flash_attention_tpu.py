"""Pallas TPU flash attention vs the reference, forward and backward, in TPU interpret mode.

Each case covers several code paths at once (interpret-mode compiles are the cost): GQA
group sizes, head dims incl. H != V, lengths off block multiples (padding), masks that skip
blocks, segment ids, soft cap, static and traced q_offset, kv_lengths, fully masked rows
and bf16. Blocks are 32 so small shapes still give multi-block grids.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flash_case import check_case
from jax.experimental.pallas import tpu as pltpu

from jaxattn import masks
from pallas_kernels.flash_attention import BlockSizes

_LAYOUT = np.tril(np.ones((4, 4), bool)) & ~np.eye(4, k=-2, dtype=bool)

CASES = {
    "g1_h64_t64_none": dict(T=64, N=1, K=1, H=64),
    "g4_h192v128_t100_causal_bwd_blocks_differ": dict(
        T=100,
        N=4,
        K=1,
        H=192,
        V=128,
        mask=masks.Causal(),
        block_sizes=BlockSizes(block_q=64, block_kv=32, block_q_bwd=32, block_kv_bwd=64),
    ),
    "g2_h128_t70_s90_sliding_segments_softcap": dict(
        T=70,
        S=90,
        N=2,
        K=1,
        H=128,
        mask=masks.SlidingWindow(left=20, right=5),
        segments=True,
        soft_cap=5.0,
    ),
    "g8_h64_t24_s100_sink_traced_offset_kvlen": dict(
        B=2,
        T=24,
        S=100,
        N=8,
        K=1,
        H=64,
        mask=masks.SinkWindow(sinks=4, window=16),
        q_offset=70,
        traced_offset=True,
        kv_lengths=[100, 81],
    ),
    "g1_h256_t64_chunked_bf16": dict(
        T=64, N=2, K=2, H=256, mask=masks.ChunkedCausal(chunk=24), dtype=jnp.bfloat16
    ),
    "g2_h64_t128_blocksparse_and_causal": dict(
        T=128,
        N=2,
        K=1,
        H=64,
        mask=masks.BlockSparse(layout=_LAYOUT, block_q=32, block_kv=32) & masks.Causal(),
    ),
    "g2_h96_t50_s80_or_fully_masked_rows": dict(
        B=2,
        T=50,
        S=80,
        N=2,
        K=1,
        H=96,
        q_offset=30,
        mask=masks.Or(masks.SlidingWindow(left=3), masks.SinkWindow(sinks=2, window=1)),
        kv_lengths=[0, 37],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_backward_matches_reference(case):
    check_case(**CASES[case])


def test_g4_h64_t40_fully_masked_rows_zero_not_nan():
    # A negative offset puts the first 8 query rows before every key: they see nothing.
    got = check_case(T=40, N=4, K=1, H=64, mask=masks.Causal(), q_offset=-8)
    (o, lse), (dq, _, _) = got
    assert np.all(np.asarray(o)[:, :8] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, :8]))
    assert np.all(np.asarray(dq)[:, :8] == 0)


def test_g2_h64_t64_causal_two_cores_no_races():
    # Megacore: the interpreter splits the "parallel" grid axes over two simulated cores and
    # the race detector checks that no output block is shared between them.
    check_case(
        T=64,
        N=2,
        K=1,
        H=64,
        mask=masks.Causal(),
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2),
    )
