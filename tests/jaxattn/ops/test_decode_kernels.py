"""The Pallas decode kernels through the op: "pallas_tpu_decode" (TPU interpreter) and
"pallas_gpu_decode" (Mosaic GPU interpreter) against "xla", outputs, LSE and gradients (the
backward goes through the reference); query offsets independent of kv_lengths; "auto" picks
them for decoding calls on TPU/GPU; what they cannot serve raises by name."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu
from visit_case import assert_close, inputs, op, value_and_grads

from jaxattn import dot_product_attention as attention
from jaxattn import masks
from jaxattn.ops._attention_args import check_args
from jaxattn.ops.attention import _choose
from pallas_kernels.decode_attention import (
    DecodeKernelBlockSizes,
    decode_attention_reference,
    decode_attention_tpu,
)

TOL = dict(atol=2e-5, rtol=2e-5)
BLOCKS = DecodeKernelBlockSizes(block_kv=32, num_splits=2)


def _compare(impl, q, k, v, do, tol=TOL, **kw):
    want = value_and_grads(op("xla", return_lse=True, **kw), q, k, v, do)
    got = value_and_grads(op(impl, return_lse=True, **kw), q, k, v, do)
    for name, g, w in zip(
        ("o", "lse", "dq", "dk", "dv"), (*got[:2], *got[2]), (*want[:2], *want[2])
    ):
        assert_close(g, w, tol, f"{impl} {name}")


def test_tpu_decode_kernel_by_name_matches_xla():
    B, T, S, K, G = 3, 2, 100, 2, 4
    q, k, v, do = inputs(0, B, T, S, K * G, K, 64, 64)
    lens = jnp.array([100, 37, 2], jnp.int32)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        # a decode step: the queries are the last T cached tokens
        _compare(
            "pallas_tpu_decode", q, k, v, do, mask=masks.Causal(), q_offset=lens - T,
            kv_lengths=lens, block_sizes=BLOCKS, logits_soft_cap=20.0,
        )  # fmt: skip
        # offsets unrelated to the lengths, a window, no kv_lengths
        _compare(
            "pallas_tpu_decode", q, k, v, do, mask=masks.SlidingWindow(left=20),
            q_offset=jnp.array([60, 5, 99], jnp.int32), block_sizes=BLOCKS,
        )  # fmt: skip


def test_tpu_decode_kernel_no_mask_and_shared_kv():
    B, T, S, N = 2, 1, 64, 8
    q, k, _, do = inputs(1, B, T, S, N, 1, 64, 64)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        got = attention(q, k, k, kv_lengths=jnp.array([64, 20]), implementation="pallas_tpu_decode")
    assert_close(got, attention(q, k, k, kv_lengths=jnp.array([64, 20]), implementation="xla"), TOL)


def test_kernel_takes_query_offsets():
    """decode_attention_tpu with q_offsets (the queries need not be the last cached tokens)."""
    q, k, v, _ = inputs(2, 2, 3, 40, 4, 2, 64, 64)
    lens, offs = jnp.array([40, 30], jnp.int32), jnp.array([10, 27], jnp.int32)
    kw = dict(q_offsets_B=offs, window=8, return_lse=True)
    o, lse = decode_attention_tpu(
        q, k, v, lens, block_sizes=DecodeKernelBlockSizes(block_kv=16), interpret=True, **kw
    )
    ro, rlse = decode_attention_reference(q, k, v, lens, **kw)
    assert_close(o, ro, TOL)
    assert_close(lse, rlse, TOL)


def test_gpu_decode_kernel_by_name_matches_xla():
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from jax._src.pallas.mosaic_gpu.interpret.params import (
        InterpretGPUParams,
        force_gpu_interpret_mode,
    )

    B, T, S, K, G = 2, 1, 128, 2, 2
    q, k, v, _ = inputs(3, B, T, S, K * G, K, 64, 64, dtype=jnp.bfloat16)
    lens = jnp.array([128, 70], jnp.int32)
    kw = dict(mask=masks.Causal(), q_offset=lens - T, kv_lengths=lens)
    with force_gpu_interpret_mode(InterpretGPUParams()):
        got = attention(q, k, v, implementation="pallas_gpu_decode", **kw)
    want = attention(q, k, v, implementation="xla", **kw)
    assert_close(got, want, dict(atol=2e-2, rtol=2e-2))


def test_auto_picks_the_decode_kernels_for_decoding(monkeypatch):
    none = dict.fromkeys(("scale", "logits_soft_cap", "segment_ids"))
    q, k, v, _ = inputs(4, 2, 1, 1024, 8, 2, 128, 128, dtype=jnp.bfloat16)
    lens = jnp.array([1024, 100], jnp.int32)
    a = check_args(q, k, v, mask=masks.Causal(), q_offset=lens - 1, kv_lengths=lens, **none)
    for backend in ("tpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert _choose(a, q, k, v, False, None) == f"pallas_{backend}_decode"
    # what the kernel cannot serve falls back: segment ids
    seg = jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1024), jnp.int32)
    a = check_args(q, k, v, mask=masks.Causal(), q_offset=None, kv_lengths=None, **{
        **none, "segment_ids": seg})  # fmt: skip
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _choose(a, q, k, v, False, None) == "decode"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mask=masks.ChunkedCausal(chunk=8)), "decode kernel serves None, Causal"),
        (dict(mask=masks.SlidingWindow(left=3, right=2)), "decode kernel serves"),
        (
            dict(segment_ids=(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 32), jnp.int32))),
            "segment",
        ),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
    ],
)
def test_decode_kernel_refusals(kw, match):
    q, k, v, _ = inputs(5, 1, 1, 32, 2, 1, 64, 64)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        with pytest.raises(NotImplementedError, match=match):
            attention(q, k, v, implementation="pallas_tpu_decode", **kw)
    with pytest.raises(NotImplementedError, match="force_tpu_interpret_mode"):
        attention(q, k, v, implementation="pallas_tpu_decode")
