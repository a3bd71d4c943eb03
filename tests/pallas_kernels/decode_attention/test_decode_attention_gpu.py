"""decode_attention_gpu (Pallas Mosaic GPU flash-decoding) vs the jnp reference in the Mosaic GPU
interpreter, and its lowering for CUDA over head dims, groups and query counts.

The interpreter simulates the TMA copies, barriers and the pipelined kv loop; its matmuls are
plain dots (its wgmma takes neither register operands nor transposed views). Each case feeds one
jitted call a batch of ragged lengths (0, short, full) as traced kv_lengths. With
JAXATTN_GPU_HARDWARE=1 on a machine whose backend is a GPU, the cases run on the device
(interpret=False) instead (benchmarks/gpu_check.sh).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (
    decode_attention_gpu,
    decode_attention_reference,
    unsupported_reason_gpu,
)

# JAXATTN_GPU_HARDWARE=1 with a GPU backend: run the kernel on the device, not interpreted.
HARDWARE = os.environ.get("JAXATTN_GPU_HARDWARE") == "1" and jax.default_backend() == "gpu"
if HARDWARE:
    INTERPRET = False
else:
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    INTERPRET = InterpretGPUParams(detect_races=True)


def _inputs(B, T, N, K, H, V, C, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, C, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, C, K, V), jnp.float32).astype(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "B, T, N, K, H, V, C, lens, kw",
    [
        (3, 1, 8, 2, 128, 128, 384, [384, 100, 0], dict(num_splits=3)),
        (2, 3, 4, 1, 64, 64, 256, [200, 3], dict(window=50, logits_soft_cap=20.0, num_splits=2)),
        (1, 2, 8, 1, 256, 256, 192, [150], dict(num_splits=None)),
        (2, 4, 2, 2, 192, 128, 128, [128, 70], dict(num_splits=1, window=33)),
    ],
    ids=["g4_h128_t1_splits3", "g4_h64_t3_window_cap", "g8_h256_t2_auto_splits", "g1_h192v128_t4"],
)
def test_matches_reference(B, T, N, K, H, V, C, lens, kw):
    q, k, v = _inputs(B, T, N, K, H, V, C, seed=C + T)
    lens = jnp.asarray(lens, jnp.int32)
    call = jax.jit(
        lambda q, k, v, l: decode_attention_gpu(
            q, k, v, l, return_lse=True, interpret=INTERPRET, **kw
        )
    )
    o, lse = call(q, k, v, lens)
    ref_kw = {n: kw[n] for n in ("window", "logits_soft_cap") if n in kw}
    ro, rl = decode_attention_reference(q, k, v, lens, return_lse=True, **ref_kw)
    np.testing.assert_allclose(
        np.asarray(o, np.float32), np.asarray(ro, np.float32), atol=2e-2, rtol=2e-2
    )
    lse, rl = np.asarray(lse), np.asarray(rl)
    assert np.array_equal(np.isneginf(lse), np.isneginf(rl)), "rows with no key must give -inf"
    fin = np.isfinite(rl)
    np.testing.assert_allclose(lse[fin], rl[fin], atol=1e-4, rtol=1e-4)
    assert np.all(np.isfinite(np.asarray(o, np.float32)))


@pytest.mark.parametrize(
    "H, V, N, K, T",
    [(64, 64, 8, 8, 1), (128, 128, 32, 4, 2), (192, 128, 16, 1, 4), (256, 256, 8, 1, 1)],
    ids=["h64_g1", "h128_g8_t2", "h192v128_g16_t4", "h256_g8"],
)
def test_lowers_to_mosaic_gpu_for_cuda(H, V, N, K, T):
    B, C = 2, 8192
    sds = jax.ShapeDtypeStruct
    args = (
        sds((B, T, N, H), jnp.bfloat16),
        sds((B, C, K, H), jnp.bfloat16),
        sds((B, C, K, V), jnp.bfloat16),
        sds((B,), jnp.int32),
    )
    fn = jax.jit(lambda q, k, v, l: decode_attention_gpu(q, k, v, l, window=1000))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_unsupported_reasons():
    q, k, v = _inputs(1, 1, 2, 1, 96, 96, 128)
    lens = jnp.array([5])
    assert "head dims" in unsupported_reason_gpu(q, k, v, lens)
    q, k, v = _inputs(1, 1, 2, 1, 64, 64, 100)
    assert "multiple of 64" in unsupported_reason_gpu(q, k, v, lens)
    q, k, v = _inputs(1, 9, 8, 1, 64, 64, 128)
    assert "64-row tile" in unsupported_reason_gpu(q, k, v, lens)
    q, k, v = _inputs(1, 1, 2, 1, 64, 64, 128, dtype=jnp.float32)
    assert "bfloat16" in unsupported_reason_gpu(q, k, v, lens)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        decode_attention_gpu(q, k, v, lens, interpret=True)
