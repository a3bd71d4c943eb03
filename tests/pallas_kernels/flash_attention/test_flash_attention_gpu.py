"""Mosaic GPU flash attention on CPU: forward and backward vs the reference in the Mosaic GPU
interpreter, and the Pallas -> Mosaic GPU lowering for CUDA over head dims and group sizes.

The interpreter simulates shared memory, TMA copies, barriers and the pipelined kv loop
(with its race detector); its matmuls are plain dots (its wgmma takes neither register
operands nor transposed views). The lowering tests run the real Mosaic GPU lowering (layout
inference, wgmma and TMA constraints) without a GPU; ptxas runs only on a GPU.
With JAXATTN_GPU_HARDWARE=1 on a machine whose backend is a GPU, the same cases run on the
device (interpret=False) instead (benchmarks/gpu_check.sh).
"""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flash_case import check_case
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn import dot_product_attention, masks
from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention import api_gpu as api

# JAXATTN_GPU_HARDWARE=1 with a GPU backend: run the kernels on the device, not interpreted.
HARDWARE = os.environ.get("JAXATTN_GPU_HARDWARE") == "1" and jax.default_backend() == "gpu"
if HARDWARE:
    INTERPRET = False
else:
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from jax._src.pallas.mosaic_gpu.interpret.params import (
        InterpretGPUParams,
        force_gpu_interpret_mode,
    )

    INTERPRET = InterpretGPUParams(detect_races=True)
B64 = BlockSizes(block_q=64, block_kv=64, block_q_bwd=64, block_kv_bwd=64)
_LAYOUT = np.tril(np.ones((3, 3), bool)) & ~np.eye(3, k=-2, dtype=bool)

CASES = {
    "g1_h64_t64_none": dict(T=64, N=1, K=1, H=64),
    "g4_h192v128_t100_causal_default_blocks": dict(
        T=100, N=4, K=1, H=192, V=128, mask=masks.Causal(), block_sizes=None
    ),
    "g2_h96_t70_s150_sliding_segments_softcap": dict(
        T=70,
        S=150,
        N=2,
        K=1,
        H=96,
        mask=masks.SlidingWindow(left=40, right=5),
        segments=True,
        soft_cap=5.0,
    ),
    "g8_h64_t24_s200_sink_traced_offset_kvlen": dict(
        B=2,
        T=24,
        S=200,
        N=8,
        K=1,
        H=64,
        mask=masks.SinkWindow(sinks=4, window=40),
        q_offset=170,
        traced_offset=True,
        kv_lengths=[200, 131],
    ),
    "g1_h256_t128_chunked_fp16_blocks_differ": dict(
        T=128,
        N=2,
        K=2,
        H=256,
        mask=masks.ChunkedCausal(chunk=48),
        dtype=jnp.float16,
        block_sizes=BlockSizes(block_q=64, block_kv=128, block_q_bwd=128, block_kv_bwd=64),
    ),
    "g2_h128_t192_blocksparse_and_causal": dict(
        T=192,
        N=2,
        K=1,
        H=128,
        mask=masks.BlockSparse(layout=_LAYOUT, block_q=64, block_kv=64) & masks.Causal(),
    ),
    "g2_h96_t50_s80_fully_masked_rows": dict(
        B=2,
        T=50,
        S=80,
        N=2,
        K=1,
        H=96,
        q_offset=30,
        mask=masks.SlidingWindow(left=3),
        kv_lengths=[0, 37],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_backward_matches_reference(case):
    kw = dict(dtype=jnp.bfloat16, block_sizes=B64, interpret=INTERPRET)
    kw.update(CASES[case])
    check_case(fn=api.flash_attention_gpu, **kw)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(
    T=st.integers(1, 150),
    S=st.integers(1, 150),
    G=st.integers(1, 8),
    H=st.sampled_from([64, 96, 128, 192, 256]),
    window=st.integers(1, 60),
    offset=st.integers(-10, 80),
    kind=st.sampled_from(["causal", "sliding", "sink", "none"]),
)
def test_fuzz_forward_backward(T, S, G, H, window, offset, kind):
    mask = {
        "causal": masks.Causal(),
        "sliding": masks.SlidingWindow(left=window, right=3),
        "sink": masks.SinkWindow(sinks=2, window=window),
        "none": None,
    }[kind]
    check_case(
        fn=api.flash_attention_gpu,
        T=T,
        S=S,
        N=G,
        K=1,
        H=H,
        mask=mask,
        q_offset=offset,
        dtype=jnp.bfloat16,
        block_sizes=B64,
        interpret=INTERPRET,
        seed=T + S,
    )


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    k = v = jnp.ones((1, 64, 1, 64), jnp.bfloat16)
    fn = lambda q, k, v: api.flash_attention_gpu(
        q, k, v, kv_lengths=jnp.zeros((1,), jnp.int32), interpret=INTERPRET, return_lse=True
    )
    (o, lse), vjp = jax.vjp(fn, q, k, v)
    assert np.all(np.asarray(o, np.float32) == 0) and np.all(np.asarray(lse) == -np.inf)
    for g in vjp((jnp.ones_like(o), jnp.ones_like(lse))):
        assert np.all(np.asarray(g, np.float32) == 0)


def test_op_pallas_gpu_under_interpret_mode_matches_xla():
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (1, 80, 4, 64), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, 80, 2, 64), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, 80, 2, 64), jnp.bfloat16)
    want = dot_product_attention(q, k, v, mask=masks.Causal(), implementation="xla")
    if not HARDWARE:  # on a GPU backend "pallas_gpu" runs without the interpreter
        with pytest.raises(NotImplementedError, match="force_gpu_interpret_mode"):
            dot_product_attention(q, k, v, mask=masks.Causal(), implementation="pallas_gpu")
    with contextlib.nullcontext() if HARDWARE else force_gpu_interpret_mode(INTERPRET):
        got = dot_product_attention(q, k, v, mask=masks.Causal(), implementation="pallas_gpu")
        with pytest.raises(NotImplementedError, match="bfloat16/float16"):
            dot_product_attention(
                q.astype(jnp.float32),
                k.astype(jnp.float32),
                v.astype(jnp.float32),
                implementation="pallas_gpu",
            )
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2, rtol=3e-2
    )


def test_unsupported_and_bad_blocks():
    q = jnp.zeros((1, 64, 2, 320), jnp.bfloat16)
    assert "up to 256" in api.unsupported_reason_gpu(q, q[:, :, :1], q[:, :, :1])
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    bad = BlockSizes(block_q=32, block_kv=64, block_q_bwd=64, block_kv_bwd=64)
    with pytest.raises(NotImplementedError, match="block_q must be a multiple of 64"):
        api.flash_attention_gpu(q, q[:, :, :1], q[:, :, :1], block_sizes=bad)
    assert api.gpu_block_sizes(256).block_kv == 64 and api.gpu_block_sizes(128).block_kv == 128


@pytest.mark.parametrize(
    "H, V, N, K, mask, extra",
    [
        (64, 64, 8, 8, masks.Causal(), {}),
        (96, 96, 6, 2, masks.SlidingWindow(left=200, right=0), dict(segments=True)),
        (128, 128, 8, 1, masks.Causal(), dict(soft_cap=30.0, kv_lengths=True)),
        (192, 128, 4, 4, masks.Causal(), {}),
        (256, 256, 5, 1, masks.ChunkedCausal(chunk=128), dict(segments=True)),
        (128, 128, 7, 7, None, dict(traced_offset=True)),
    ],
    ids=["h64_g1", "h96_g3_window_seg", "h128_g8_softcap_kvlen", "h192v128_g1", "h256_g5", "g1"],
)
def test_fwd_bwd_lowers_to_mosaic_gpu_for_cuda(H, V, N, K, mask, extra):
    """Pallas -> Mosaic GPU lowering of forward + dq + dk/dv at hardware block sizes."""
    B, T = 2, 1000
    sds = jax.ShapeDtypeStruct
    q, k = sds((B, T, N, H), jnp.bfloat16), sds((B, T, K, H), jnp.bfloat16)
    v = sds((B, T, K, V), jnp.bfloat16)
    seg, lens, off = sds((B, T), jnp.int32), sds((B,), jnp.int32), sds((), jnp.int32)

    def fwd_bwd(q, k, v, seg, lens, off):
        call = lambda q, k, v: api.flash_attention_gpu(
            q,
            k,
            v,
            mask=mask,
            segment_ids=seg if extra.get("segments") else None,
            kv_lengths=lens if extra.get("kv_lengths") else None,
            q_offset=off if extra.get("traced_offset") else 0,
            logits_soft_cap=extra.get("soft_cap"),
        )
        o, vjp = jax.vjp(call, q, k, v)
        return o, vjp(o)

    lowered = jax.jit(fwd_bwd).trace(q, k, v, seg, lens, off).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("mosaic_gpu") >= 3, "expected forward, dq and dk/dv Mosaic GPU kernels"
