"""flash_attention: block maps (work skipped), forward over every mask kind, fuzzing,
unsupported calls and bad input. Kernels run in TPU interpret mode on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flash_case import FAST_COMPILE, INTERPRET, SMALL, check_case, make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxattn import masks
from pallas_kernels import block_tables as bt
from pallas_kernels.flash_attention import (
    BlockSizes,
    attention_reference,
    flash_attention,
    unsupported_reason,
)


def _build(mask, T=512, S=512, block=64, q_offset=0, kv_lengths=None, transpose=False):
    return bt.build(
        mask,
        q_len=T,
        kv_len=S,
        block_q=block,
        block_kv=block,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        per_batch=True,
        transpose=transpose,
        leaf_bits=True,
    )


def test_block_map_causal_visits_about_half():
    full, causal = _build(None), _build(masks.Causal())
    visited, total = int(causal.count.sum()), int(full.count.sum())
    assert total == 8 * 8 and visited == 8 * 9 // 2  # the diagonal and below: (n + 1) / 2n
    assert visited / total < 0.6
    # Only the 8 diagonal blocks need the elementwise mask; the rest are flagged full.
    flags, count = np.asarray(causal.flags).reshape(8, 8), np.asarray(causal.count).reshape(8)
    n_full = sum(int(np.sum(flags[i, :c] & bt.FULL_BIT)) for i, c in enumerate(count))
    assert n_full == visited - 8
    # The transposed map (dk/dv kernel) visits the same blocks.
    assert int(_build(masks.Causal(), transpose=True).count.sum()) == visited


def test_block_map_sliding_window_is_linear_and_shortens_the_grid():
    window = masks.SlidingWindow(left=127)
    short = _build(window, T=1024, S=1024)
    assert short.shape[3] == 3  # ceil(128 / 64) + 1 blocks per row, not 16
    assert int(short.count.sum()) <= 3 * 16
    sink = _build(masks.SinkWindow(sinks=4, window=128), T=1024, S=1024)
    assert sink.shape[3] == 4  # the sink block, plus the window's


def test_block_map_traced_offset_and_kv_lengths():
    def counts(off, lens):
        return _build(masks.Causal(), T=128, S=512, q_offset=off, kv_lengths=lens).count

    lens = jnp.array([512, 100], jnp.int32)
    traced = jax.jit(counts)(jnp.int32(384), lens)
    static = counts(384, lens)
    np.testing.assert_array_equal(traced, static)
    np.testing.assert_array_equal(np.asarray(static).reshape(2, 2), [[7, 8], [2, 2]])


FORWARD = {
    "g2_h64_t72_full": dict(T=72, N=2, K=1, H=64, mask=masks.Full()),
    "g1_h64_t64_s96_sliding_right": dict(
        T=64, S=96, N=1, K=1, H=64, mask=masks.SlidingWindow(left=9, right=17)
    ),
    "g2_h64_t8_s100_causal_decode_offset": dict(
        T=8, S=100, N=2, K=1, H=64, mask=masks.Causal(), q_offset=92
    ),
    "g4_h64_t60_and_chunked_sink": dict(
        T=60,
        N=4,
        K=1,
        H=64,
        mask=masks.ChunkedCausal(chunk=40) & masks.SinkWindow(sinks=3, window=20),
    ),
    "g1_h64_t64_blocksparse_or_sliding": dict(
        T=64,
        N=1,
        K=1,
        H=64,
        mask=masks.BlockSparse(
            layout=np.array([[True, False], [False, False]]), block_q=32, block_kv=32
        )
        | masks.SlidingWindow(left=4),
    ),
}


@pytest.mark.parametrize("case", list(FORWARD), ids=list(FORWARD))
def test_forward_matches_reference(case):
    check_case(grad=False, **FORWARD[case])


@settings(max_examples=3, deadline=None, derandomize=True)
@given(
    T=st.integers(1, 80),
    S=st.integers(1, 80),
    G=st.sampled_from([1, 2]),
    window=st.integers(1, 40),
    offset=st.integers(-10, 40),
    kind=st.sampled_from(["causal", "sliding", "sink"]),
)
def test_fuzz_forward(T, S, G, window, offset, kind):
    mask = {
        "causal": masks.Causal(),
        "sliding": masks.SlidingWindow(left=window, right=2),
        "sink": masks.SinkWindow(sinks=2, window=window),
    }[kind]
    check_case(T=T, S=S, N=G, K=1, H=64, mask=mask, q_offset=offset, grad=False, seed=T + S)


def _qkv(T=16, S=16, N=2, K=1, H=64, dtype=jnp.float32):
    return (
        jnp.zeros((1, T, N, H), dtype),
        jnp.zeros((1, S, K, H), dtype),
        jnp.zeros((1, S, K, H), dtype),
    )


def test_unsupported_reason():
    q, k, v = _qkv()
    assert unsupported_reason(q, k, v, mask=masks.Causal()) is None
    assert "dense" in unsupported_reason(q, k, v, mask=np.ones((16, 16), bool))
    assert "int8" in unsupported_reason(*_qkv(dtype=jnp.int8))
    # 8x8 cells alternate inside the kernel's 16x16 blocks: not readable per block.
    misaligned = masks.BlockSparse(layout=np.eye(2, dtype=bool), block_q=8, block_kv=8)
    reason = unsupported_reason(q, k, v, mask=misaligned, block_sizes=SMALL)
    assert "BlockSparse" in reason
    with pytest.raises(NotImplementedError, match="BlockSparse"):
        flash_attention(q, k, v, mask=misaligned, block_sizes=SMALL, interpret=True)
    reasons = []
    jax.jit(lambda off: reasons.append(unsupported_reason(q, k, v, mask=misaligned, q_offset=off)))(
        jnp.int32(0)
    )
    assert "static" in reasons[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=jnp.zeros((1, 16, 3, 64)), v=jnp.zeros((1, 16, 3, 64))), "multiple of kv heads"),
        (dict(q=jnp.zeros((16, 2, 64))), "rank 4"),
        (dict(v=jnp.zeros((1, 12, 1, 64))), "k and v"),
        (dict(k=jnp.zeros((1, 16, 1, 32)), v=jnp.zeros((1, 16, 1, 32))), "head dim"),
        (dict(v=jnp.zeros((1, 16, 1, 64), jnp.bfloat16)), "dtype"),
        (
            dict(segment_ids=(jnp.zeros((1, 15), jnp.int32), jnp.zeros((1, 16), jnp.int32))),
            "segment_ids",
        ),
        (dict(kv_lengths=jnp.zeros((2,), jnp.int32)), "kv_lengths"),
        (dict(q_offset=jnp.zeros((2,), jnp.int32)), "q_offset"),
        (dict(scale=-1.0), "scale"),
    ],
    ids=[
        "heads",
        "rank",
        "kv_len",
        "head_dim",
        "dtype",
        "segments",
        "kv_lengths",
        "q_offset",
        "scale",
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    q, k, v = _qkv()
    q, k, v = kwargs.pop("q", q), kwargs.pop("k", k), kwargs.pop("v", v)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, interpret=True, **kwargs)


def test_block_sizes_validation_and_defaults():
    with pytest.raises(ValueError, match="block_q"):
        BlockSizes(block_q=12)
    v5e = BlockSizes.default_for("TPU v5 lite")
    assert (v5e.block_q, v5e.block_kv) == (256, 512)
    assert BlockSizes.default_for("TPU v6 lite", head_dim=256).block_kv == 512
    assert BlockSizes.default_for("cpu").block_q == 512


def test_g2_h64_t40_causal_under_shard_map_over_batch():
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    q, k, v, do, _ = make_inputs(0, B=2, T=40, S=40, N=2, K=1, H=64, V=64)

    def run(attn):
        def fn(q, k, v):
            o, vjp = jax.vjp(attn, q, k, v)
            return o, vjp(do)

        return fn

    kernel = lambda q, k, v: flash_attention(
        q, k, v, mask=masks.Causal(), block_sizes=SMALL, interpret=INTERPRET
    )
    sharded = jax.shard_map(kernel, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data"))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    got = jax.jit(run(sharded), compiler_options=FAST_COMPILE)(put(q), put(k), put(v))
    want = run(lambda q, k, v: attention_reference(q, k, v, mask=masks.Causal()))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-4, rtol=2e-4)


def test_hardware_block_sizes_must_tile_lanes():
    q, k, v = _qkv(T=256, S=256)
    with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128"):
        flash_attention(q, k, v, block_sizes=BlockSizes(block_q=64), interpret=False)


@pytest.mark.parametrize(
    "mask, extra",
    [
        (masks.Causal(), {}),
        (masks.ChunkedCausal(chunk=100), dict(segments=True, soft_cap=30.0, kv_lengths=True)),
        (
            masks.BlockSparse(layout=np.tril(np.ones((3, 3), bool)), block_q=128, block_kv=128)
            & masks.SinkWindow(sinks=4, window=64),
            {},
        ),
    ],
    ids=["causal", "chunked_segments_softcap_kvlen", "blocksparse_and_sink"],
)
def test_g2_h192v128_t300_lowers_to_mosaic_for_tpu(mask, extra):
    """Exports fwd + bwd for a TPU v5e without a TPU: the Pallas -> Mosaic lowering runs
    (Mosaic's own layout passes run only in the TPU compiler, not here)."""
    try:
        from jax._src import mesh as mesh_lib  # private: the abstract device kind

        device = mesh_lib.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
        abstract_mesh = mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"no abstract TPU device in this jax: {e}")
    B, T, N, K, H, V = 2, 300, 4, 2, 192, 128
    sds = jax.ShapeDtypeStruct
    q, k, v = (
        sds((B, T, N, H), jnp.bfloat16),
        sds((B, T, K, H), jnp.bfloat16),
        sds((B, T, K, V), jnp.bfloat16),
    )
    seg, lens = sds((B, T), jnp.int32), sds((B,), jnp.int32)
    blocks = BlockSizes(block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=128)

    def fwd_bwd(q, k, v, seg, lens):
        call = lambda q, k, v: flash_attention(
            q,
            k,
            v,
            mask=mask,
            block_sizes=blocks,
            return_lse=True,
            segment_ids=(seg, seg) if extra.get("segments") else None,
            kv_lengths=lens if extra.get("kv_lengths") else None,
            logits_soft_cap=extra.get("soft_cap"),
        )
        out, vjp = jax.vjp(call, q, k, v)
        return vjp(out)

    with jax.sharding.use_abstract_mesh(abstract_mesh):
        exported = jax.export.export(jax.jit(fwd_bwd), platforms=["tpu"])(q, k, v, seg, lens)
    assert exported.mlir_module().count("tpu_custom_call") == 3  # fwd, dq, dk/dv
