"""Block-visit lists in the Pallas flash kernels (TPU interpreter; Mosaic GPU interpreter where
it runs): forward and backward against jax.nn.dot_product_attention under the equivalent dense
mask, lists shared or per batch row and kv head, list blocks equal to or coarser than the
kernel's; the visit tables bound the grid by the list length, and unlisted blocks are never
read (NaN there leaves the result finite).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flash_case import INTERPRET

from jaxattn import masks
from pallas_kernels import block_tables
from pallas_kernels.flash_attention import BlockSizes, flash_attention, unsupported_reason

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "jaxattn", "ops"))
from visit_case import (  # noqa: E402
    assert_close,
    compare_with_jax_nn,
    compile_value_and_grads,
    dense_from_visits,
    inputs,
    jax_nn,
    random_visits,
    seen_rows,
    value_and_grads_many,
)

B32 = BlockSizes(block_q=32, block_kv=32, block_q_bwd=32, block_kv_bwd=32)
TOL = dict(atol=2e-4, rtol=2e-4)

CASES = {
    # per (batch row, kv head) lists at the kernel's block size, T and S off blocks, GQA 2
    "g2_t70_s100_per_head_causal_lists32": dict(
        B=2, T=70, S=100, K=2, G=2, Bv=2, Kv=2, lq=32, lk=32, mask=masks.Causal(), off=30
    ),
    # lists coarser than the kernel's blocks (64 = 2 kernel blocks), shared, kv_lengths, GQA 4
    "g4_t64_s128_shared_lists64_kvlen": dict(
        B=2, T=64, S=128, K=1, G=4, Bv=1, Kv=1, lq=64, lk=64, mask=None, off=0, lens=[128, 75]
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tpu_kernel_with_visits_matches_jax_nn(case):
    c = CASES[case]
    B, T, S, K, G = c["B"], c["T"], c["S"], c["K"], c["G"]
    rng = np.random.default_rng(T + S)
    visits = random_visits(
        rng, Bv=c["Bv"], Kv=c["Kv"], T=T, S=S, block_q=c["lq"], block_kv=c["lk"], L=3
    )
    q, k, v, do = inputs(T, B, T, S, K * G, K, 64, 64)
    lens = None if "lens" not in c else jnp.asarray(c["lens"], jnp.int32)
    mask = c["mask"]

    def fn(q, k, v):
        return flash_attention(
            q, k, v, mask=mask, q_offset=c["off"], kv_lengths=lens, block_visits=visits,
            block_sizes=B32, interpret=INTERPRET,
        )  # fmt: skip

    dense = dense_from_visits(visits, B=B, N=K * G, K=K, T=T, S=S)
    if mask is not None:
        dense = dense & np.asarray(masks.materialize(mask, T, S, c["off"]))
    if lens is not None:
        dense = dense & (np.arange(S) < np.asarray(lens)[:, None, None, None])
    compare_with_jax_nn(fn, q, k, v, do, dense, TOL)


def test_tables_bound_the_grid_and_unlisted_blocks_are_never_read():
    B, T, S, K, N = 1, 64, 256, 1, 2
    idx = jnp.array([[[[6, 1], [7, 0]]]], jnp.int32)  # 2 of 8 kv blocks per query block
    visits = masks.BlockVisits(
        indices=idx, counts=jnp.array([[[2, 1]]], jnp.int32), block_q=32, block_kv=32
    )
    tables = block_tables.build(None, q_len=T, kv_len=S, block_q=32, block_kv=32, visits=[visits])
    assert tables.shape[3] == 2  # the grid walks 2 steps, not 8
    np.testing.assert_array_equal(np.asarray(tables.index)[0, 0], [[1, 6], [7, 7]])
    listed = dense_from_visits(visits, B=B, N=K, K=K, T=T, S=S).any(2)[:, 0]  # [B, S]
    q, k, v, do = inputs(1, B, T, S, N, K, 64, 64)
    keep = jnp.asarray(listed)[:, :, None, None]
    fn = lambda q, k, v: flash_attention(
        q, k, v, block_visits=visits, block_sizes=B32, interpret=INTERPRET, return_lse=True
    )
    run = compile_value_and_grads([fn], q, k, v, [do])  # one compile for both runs
    (clean,) = run(q, k, v, [do])
    (poisoned,) = run(q, jnp.where(keep, k, jnp.nan), jnp.where(keep, v, jnp.nan), [do])
    for g, w in zip((*poisoned[:2], poisoned[2][0]), (*clean[:2], clean[2][0])):
        assert_close(g, w, TOL)


def test_blocks_that_do_not_nest_are_refused():
    q = jnp.zeros((1, 64, 2, 64))
    k = jnp.zeros((1, 64, 1, 64))
    visits = masks.BlockVisits(
        indices=jnp.zeros((1, 1, 4, 1), jnp.int32),
        counts=jnp.ones((1, 1, 4), jnp.int32),
        block_q=16,
        block_kv=16,
    )
    reason = unsupported_reason(q, k, k, block_sizes=B32, block_visits=visits)
    assert "must nest inside the visit lists' blocks" in reason
    with pytest.raises(NotImplementedError, match="nest"):
        flash_attention(q, k, k, block_visits=visits, block_sizes=B32, interpret=True)
    # the default block sizes adapt to the lists
    assert unsupported_reason(q, k, k, block_visits=visits) is None


def test_op_routes_visits_to_the_tpu_kernel():
    from jax.experimental.pallas import tpu as pltpu

    from jaxattn import dot_product_attention

    B, T, S, K, G = 1, 40, 72, 2, 2
    visits = random_visits(
        np.random.default_rng(0), Bv=1, Kv=K, T=T, S=S, block_q=16, block_kv=24, L=2
    )
    q, k, v, _ = inputs(3, B, T, S, K * G, K, 32, 32)
    want = jax.jit(
        lambda q, k, v: dot_product_attention(q, k, v, block_visits=visits, implementation="xla")
    )(q, k, v)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        got = jax.jit(lambda q, k, v: dot_product_attention(
            q, k, v, block_visits=visits, implementation="pallas_tpu",
            block_sizes=BlockSizes(block_q=8, block_kv=8, block_q_bwd=16, block_kv_bwd=8),
        ))(q, k, v)  # fmt: skip
    assert_close(got, want, TOL)


def test_gpu_kernel_with_per_head_visits_matches_jax_nn():
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    from pallas_kernels.flash_attention import flash_attention_gpu

    B, T, S, K, G = 1, 100, 192, 2, 2
    visits = random_visits(
        np.random.default_rng(7), Bv=1, Kv=K, T=T, S=S, block_q=64, block_kv=64, L=2
    )
    q, k, v, do = inputs(8, B, T, S, K * G, K, 64, 64, dtype=jnp.bfloat16)
    b64 = BlockSizes(block_q=64, block_kv=64, block_q_bwd=64, block_kv_bwd=64)
    fn = lambda q, k, v: flash_attention_gpu(
        q, k, v, mask=masks.Causal(), q_offset=S - T, block_visits=visits, block_sizes=b64,
        interpret=InterpretGPUParams(detect_races=True),
    )  # fmt: skip
    dense = dense_from_visits(visits, B=B, N=K * G, K=K, T=T, S=S)
    dense = dense & np.asarray(masks.materialize(masks.Causal(), T, S, S - T))
    seen = seen_rows(dense)
    do = jnp.where(seen, do, 0.0)
    as32 = lambda x: x.astype(jnp.float32)
    got, want = value_and_grads_many(  # one compile for both
        [fn, lambda q, k, v: jax_nn(dense)(as32(q), as32(k), as32(v))], q, k, v, [do, do]
    )
    for g, w in zip((jnp.where(seen, got[0], 0), *got[2]), (jnp.where(seen, want[0], 0), *want[2])):
        scale = max(1.0, float(jnp.max(jnp.abs(w))))
        assert_close(g, w, dict(atol=3e-2 * scale, rtol=3e-2))
