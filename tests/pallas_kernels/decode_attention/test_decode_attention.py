"""decode_attention_tpu (Pallas TPU kernel, run in the TPU interpreter) vs the jnp reference and
jax.nn.dot_product_attention.

Interpreter compiles dominate the run time (seconds per shape), so each case compiles one
jitted call and feeds it a batch of ragged lengths (0, short, C, ...) as traced kv_lengths.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import (
    DecodeKernelBlockSizes,
    decode_attention_reference,
    decode_attention_tpu,
    unsupported_reason,
)
from pallas_kernels.decode_attention.reference import visible_mask


@dataclasses.dataclass(frozen=True)
class Case:
    G: int
    K: int
    H: int
    V: int
    C: int
    T: int
    lens: tuple
    block_kv: int = 32
    splits: int | None = 2
    window: int | None = None
    cap: float | None = None
    dtype: str = "float32"
    shared_kv: bool = False  # v is k (absorbed MLA: one latent cache read once)

    @property
    def name(self):
        hv = f"h{self.H}" if self.H == self.V else f"h{self.H}v{self.V}"
        s = f"g{self.G}k{self.K}_{hv}_c{self.C}_t{self.T}_b{self.block_kv}_split{self.splits}"
        s += f"_w{self.window}" if self.window else ""
        s += "_cap" if self.cap else ""
        s += "_sharedkv" if self.shared_kv else ""
        return s + ("_bf16" if self.dtype == "bfloat16" else "")


# Features are combined so that each case (one interpreter compile) covers several of them.
CASES = [
    Case(G=1, K=2, H=128, V=128, C=300, T=1, lens=(300, 0, 17, 129, 310), block_kv=64, splits=3),
    Case(G=2, K=2, H=64, V=64, C=100, T=3, lens=(100, 0, 2, 20), block_kv=16, splits=3, window=17),
    Case(G=4, K=2, H=128, V=128, C=300, T=1, lens=(300, 1, 64), block_kv=64, splits=1),
    Case(G=8, K=1, H=128, V=128, C=200, T=3, lens=(199, 3, 0), splits=4, cap=5.0),
    Case(G=4, K=2, H=192, V=128, C=150, T=1, lens=(150, 31), splits=2),
    Case(G=16, K=1, H=576, V=512, C=130, T=1, lens=(130, 65), splits=2, dtype="bfloat16"),
    Case(G=8, K=1, H=576, V=576, C=50, T=2, lens=(50, 1), block_kv=16, splits=2, shared_kv=True),
    Case(G=2, K=2, H=256, V=256, C=70, T=3, lens=(70, 5, 0), splits=3, window=40, dtype="bfloat16"),
    Case(G=2, K=2, H=128, V=128, C=40, T=1, lens=(40, 0, 7), block_kv=512, splits=None),
]


def _inputs(B, T, N, K, H, V, C, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, C, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, C, K, V), jnp.float32).astype(dtype)
    return q, k, v


@functools.cache
def _kernel_fn(block_kv, splits, window, cap):
    return jax.jit(
        functools.partial(
            decode_attention_tpu,
            block_sizes=DecodeKernelBlockSizes(block_kv=block_kv, num_splits=splits),
            window=window,
            logits_soft_cap=cap,
            return_lse=True,
            interpret=pltpu.InterpretParams(),
        )
    )


def _run_case(c: Case):
    B, N = len(c.lens), c.G * c.K
    q, k, v = _inputs(B, c.T, N, c.K, c.H, c.V, c.C, jnp.dtype(c.dtype))
    v = k if c.shared_kv else v
    lens = jnp.asarray(c.lens, jnp.int32)
    o, lse = _kernel_fn(c.block_kv, c.splits, c.window, c.cap)(q, k, v, lens)
    return q, k, v, lens, o, lse


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(c):
    q, k, v, lens, o, lse = _run_case(c)
    ro, rlse = decode_attention_reference(
        q, k, v, lens, window=c.window, logits_soft_cap=c.cap, return_lse=True
    )
    assert o.shape == (len(c.lens), c.T, c.G * c.K, c.V) and o.dtype == q.dtype
    assert lse.shape == (len(c.lens), c.G * c.K, c.T) and lse.dtype == jnp.float32
    o, ro = np.asarray(o, np.float32), np.asarray(ro, np.float32)
    assert not np.isnan(o).any() and not np.isnan(np.asarray(lse)).any()
    tol = 2e-5 if c.dtype == "float32" else 3e-2
    np.testing.assert_allclose(o, ro, atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(rlse), atol=tol, rtol=tol)
    # Rows with no visible key (kv_length 0, or fewer keys than queries): zeros, lse -inf.
    seen_BT = np.asarray(visible_mask(lens, c.T, c.C, c.window).any(-1))
    assert (o[~seen_BT] == 0).all()
    assert np.isneginf(np.asarray(lse).transpose(0, 2, 1)[~seen_BT]).all()


@pytest.mark.parametrize(
    "c", [c for c in CASES if c.H == c.V and c.cap is None], ids=lambda c: c.name
)
def test_kernel_matches_jax_nn(c):
    q, k, v, lens, o, _ = _run_case(c)
    if c.T == 1 and c.window is None:
        # The query is the last cached token: a plain kv-length mask is the whole story.
        want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lens)
    else:
        mask_B1TC = visible_mask(lens, c.T, c.C, c.window)[:, None]
        want = jax.nn.dot_product_attention(q, k, v, mask=mask_B1TC)
    seen_BT = np.asarray(visible_mask(lens, c.T, c.C, c.window).any(-1))
    tol = 2e-5 if c.dtype == "float32" else 3e-2
    np.testing.assert_allclose(
        np.asarray(o, np.float32)[seen_BT],
        np.asarray(want, np.float32)[seen_BT],
        atol=tol,
        rtol=tol,
    )


def test_visible_mask_matches_definition():
    lens, T, C, W = np.array([0, 1, 5, 9]), 3, 9, 4
    got = np.asarray(visible_mask(jnp.asarray(lens), T, C, W))
    for b, n in enumerate(lens):
        for t in range(T):
            p = n - T + t
            for j in range(C):
                assert got[b, t, j] == (j <= p and j < n and p - j < W), (b, t, j)


def test_block_sizes_resolve():
    assert DecodeKernelBlockSizes(block_kv=512).resolve(B=1, K=1, C=300) == (300, 1)
    assert DecodeKernelBlockSizes(block_kv=64, num_splits=10).resolve(B=1, K=1, C=300) == (64, 5)
    assert DecodeKernelBlockSizes(block_kv=64).resolve(B=1, K=2, C=300) == (64, 4)
    assert DecodeKernelBlockSizes(block_kv=64).resolve(B=16, K=8, C=300) == (64, 1)
    with pytest.raises(ValueError, match="num_splits"):
        DecodeKernelBlockSizes(num_splits=0)


def test_bad_input_raises_value_error():
    q, k, v = _inputs(2, 1, 6, 4, 64, 64, 16, jnp.float32)
    lens = jnp.array([3, 4])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention_tpu(q, k, v, lens, interpret=True)
    q, k, v = _inputs(2, 1, 8, 4, 64, 64, 16, jnp.float32)
    with pytest.raises(ValueError, match="disagree"):
        decode_attention_tpu(q, k, v[:1], lens, interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention_tpu(q, k.astype(jnp.bfloat16), v, lens, interpret=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        decode_attention_tpu(
            q, k, v, lens, block_sizes=DecodeKernelBlockSizes(block_kv=12), interpret=True
        )
    with pytest.raises(ValueError, match="window"):
        decode_attention_tpu(q, k, v, lens, window=0, interpret=True)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the non-TPU refusal")
def test_needs_tpu_or_interpret():
    q, k, v = _inputs(1, 1, 2, 1, 64, 64, 16, jnp.float32)
    lens = jnp.array([5])
    assert "TPU" in unsupported_reason(q, k, v, lens)
    assert unsupported_reason(q, k, v, lens, interpret=True) is None
    with pytest.raises(NotImplementedError, match="interpret"):
        decode_attention_tpu(q, k, v, lens)
