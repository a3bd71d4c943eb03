"""Hypothesis fuzz of decode_attention_tpu (TPU interpreter) against the jnp reference.

Few examples: each new shape is an interpreter compile of several seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention import (
    DecodeKernelBlockSizes,
    decode_attention_reference,
    decode_attention_tpu,
)


@st.composite
def decode_cases(draw):
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 90))
    return dict(
        B=B,
        T=draw(st.integers(1, 4)),
        G=draw(st.sampled_from([1, 2, 4, 8])),
        K=draw(st.sampled_from([1, 2])),
        H=draw(st.sampled_from([64, 128])),
        C=C,
        lens=draw(st.lists(st.integers(0, C), min_size=B, max_size=B)),
        block_kv=draw(st.sampled_from([8, 16, 32])),
        splits=draw(st.integers(1, 4)),
        window=draw(st.one_of(st.none(), st.integers(1, C + 2))),
        cap=draw(st.one_of(st.none(), st.just(4.0))),
    )


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decode_cases())
def test_fuzz_decode_matches_reference(c):
    N = c["G"] * c["K"]
    kq, kk, kv = jax.random.split(jax.random.key(c["C"]), 3)
    q = jax.random.normal(kq, (c["B"], c["T"], N, c["H"]), jnp.float32)
    k = jax.random.normal(kk, (c["B"], c["C"], c["K"], c["H"]), jnp.float32)
    v = jax.random.normal(kv, (c["B"], c["C"], c["K"], c["H"]), jnp.float32)
    lens = jnp.asarray(c["lens"], jnp.int32)
    kw = dict(window=c["window"], logits_soft_cap=c["cap"], return_lse=True)
    o, lse = decode_attention_tpu(
        q,
        k,
        v,
        lens,
        block_sizes=DecodeKernelBlockSizes(block_kv=c["block_kv"], num_splits=c["splits"]),
        interpret=pltpu.InterpretParams(),
        **kw,
    )
    ro, rlse = decode_attention_reference(q, k, v, lens, **kw)
    assert not np.isnan(np.asarray(o)).any()
    np.testing.assert_allclose(np.asarray(o), np.asarray(ro), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(rlse), atol=2e-5, rtol=2e-5)
