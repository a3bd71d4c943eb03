"""Hypothesis fuzzing of the chunked implementation against the xla reference.

Shapes, group sizes, block sizes, mask parameters, offsets and lengths are drawn at random;
outputs, LSE and the gradients of q, k and v must agree.
"""

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxattn import dot_product_attention as attention
from jaxattn import masks
from jaxattn.ops.attention_chunked import ChunkedBlockSizes


@st.composite
def _mask(draw):
    kind = draw(st.sampled_from(["none", "causal", "window", "sink", "chunk", "sparse", "dense"]))
    if kind == "causal":
        return masks.Causal()
    if kind == "window":
        return masks.SlidingWindow(left=draw(st.integers(0, 40)), right=draw(st.integers(0, 10)))
    if kind == "sink":
        return masks.SinkWindow(sinks=draw(st.integers(0, 6)), window=draw(st.integers(1, 30)))
    if kind == "chunk":
        return masks.ChunkedCausal(chunk=draw(st.integers(1, 50)))
    if kind == "sparse":
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        return masks.BlockSparse(
            layout=rng.random((12, 12)) < 0.5,
            block_q=draw(st.integers(4, 20)),
            block_kv=draw(st.integers(4, 20)),
        )
    return kind


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 90),
    S=st.integers(1, 90),
    K=st.integers(1, 2),
    G=st.sampled_from([1, 2, 3, 4]),
    H=st.sampled_from([8, 16, 24]),
    V=st.sampled_from([8, 16]),
    bq=st.integers(1, 40),
    bk=st.integers(1, 40),
    mask=_mask(),
    q_offset=st.one_of(st.none(), st.integers(0, 30)),
    use_lengths=st.booleans(),
    soft_cap=st.one_of(st.none(), st.floats(1.0, 10.0)),
    seed=st.integers(0, 2**16),
)
def test_fuzz_chunked_vs_reference(
    B, T, S, K, G, H, V, bq, bk, mask, q_offset, use_lengths, soft_cap, seed
):
    q_offset = None if q_offset is None else min(q_offset, S)  # query row 0 lies in [0, S]
    keys = jax.random.split(jax.random.key(seed), 6)
    N = K * G
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, S, K, H))
    v = jax.random.normal(keys[2], (B, S, K, V))
    do = jax.random.normal(keys[3], (B, T, N, V))
    if mask == "none":
        mask = None
    elif mask == "dense":
        mask = jax.random.bernoulli(keys[4], 0.6, (B, T, S))
    lengths = jax.random.randint(keys[5], (B,), 0, S + 1) if use_lengths else None
    kw = dict(mask=mask, q_offset=q_offset, kv_lengths=lengths, logits_soft_cap=soft_cap)

    def run(impl, **extra):
        def f(q, k, v):
            o, lse = attention(q, k, v, implementation=impl, return_lse=True, **kw, **extra)
            return (o * do).sum(), (o, lse)

        vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
        fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
        (_, out), grads = vg.lower(q, k, v).compile(compiler_options=fast)(q, k, v)
        return (*out, *grads)

    want = run("xla")
    got = run("chunked", block_sizes=ChunkedBlockSizes(block_q=bq, block_kv=bk))
    for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert not np.isnan(g).any(), name
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=name)
