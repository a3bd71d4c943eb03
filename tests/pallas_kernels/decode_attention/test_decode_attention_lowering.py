"""TPU-side checks that need no TPU: the kernel lowers to Mosaic MLIR at production shapes,
and its index maps skip the DMA of dead cache blocks.

Lowering with ``lowering_platforms=("tpu",)`` runs the Pallas -> Mosaic conversion (block
shape tiling rules, primitive lowering rules) without a TPU; Mosaic's own compilation still
needs one. The interpreter tests do not see these rules, so this is the cheap guard for them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import tpu
from pallas_kernels.decode_attention.reference import visible_mask

SHAPES = [
    # (T, N, K, H, V, C, block_kv, num_splits, window, cap, shared_kv, dtype)
    (1, 32, 8, 128, 128, 4096, 512, 2, None, None, False, "bfloat16"),
    (4, 32, 8, 128, 128, 4000, 512, 3, 1024, 30.0, False, "bfloat16"),
    (1, 16, 1, 576, 512, 4096, 512, 4, None, None, False, "bfloat16"),
    (1, 16, 1, 576, 576, 4096, 512, 4, None, None, True, "bfloat16"),
    (3, 8, 4, 64, 64, 1000, 256, 2, None, None, False, "bfloat16"),
    (2, 8, 4, 192, 128, 1000, 256, 2, None, None, False, "float32"),
    (1, 16, 2, 256, 256, 3000, 1024, 1, 512, None, False, "float32"),
]


def _name(s):
    T, N, K, H, V, C, bk, ns, w, cap, shared, dtype = s
    return f"g{N // K}k{K}_h{H}v{V}_c{C}_t{T}_b{bk}_split{ns}_w{w}_cap{cap}_shared{shared}_{dtype}"


@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_lowers_to_mosaic(shape):
    T, N, K, H, V, C, block_kv, splits, window, cap, shared, dtype = shape
    B, G, dtype = 2, N // K, jnp.dtype(dtype)
    q = jax.ShapeDtypeStruct((B, K, G * T, H), dtype)
    k = jax.ShapeDtypeStruct((B, C, K, H), dtype)
    v = k if shared else jax.ShapeDtypeStruct((B, C, K, V), dtype)
    lens = jax.ShapeDtypeStruct((B,), jnp.int32)
    f = functools.partial(
        tpu.decode_partials,
        T=T,
        block_kv=block_kv,
        num_splits=splits,
        scale=H**-0.5,
        soft_cap=cap,
        window=window,
        shared_kv=shared,
    )
    try:
        text = jax.jit(f).trace(q, k, v, lens).lower(lowering_platforms=("tpu",)).as_text()
    except ValueError as e:
        if "TPU device kind" in str(e):  # a lowering rule that asks the chip generation
            pytest.skip(f"this jax's Mosaic lowering needs a TPU: {e}")
        raise
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("splits", [1, 3])
def test_dead_blocks_issue_no_dma_c40_b8(T, window, splits):
    # Walk one (b, h) row of the grid in order: a DMA happens where the block index changes.
    C, block_kv = 40, 8
    num_blocks = -(-C // block_kv)
    bps = -(-num_blocks // splits)
    lens = jnp.arange(C + 4, dtype=jnp.int32)  # every kv length at once (> C: bad input)
    steps = jnp.arange(splits * bps, dtype=jnp.int32)[:, None]
    kw = dict(T=T, block_kv=block_kv, window=window, cache_len=C)
    fetched = np.asarray(tpu.kv_block_index(steps, lens, **kw))  # [steps, lens]
    live = np.asarray(tpu.block_is_live(steps, lens, **kw))
    mask = np.asarray(visible_mask(lens, T, C, window))  # [lens, T, C]
    assert fetched.max() == num_blocks - 1  # never past the cache, even for kv_len > C
    for n in range(C + 4):
        dmas = 1 + int((np.diff(fetched[:, n]) != 0).sum())
        assert dmas == max(int(live[:, n].sum()), 1), n
        # Live steps fetch their own block; live blocks are exactly those with a visible key.
        assert (fetched[live[:, n], n] == steps[live[:, n], 0]).all(), n
        has_key = mask[n].any(0).reshape(num_blocks, block_kv).any(1)
        want = np.zeros(splits * bps, bool)
        want[:num_blocks] = has_key
        np.testing.assert_array_equal(live[:, n], want, err_msg=f"kv_len {n}")
