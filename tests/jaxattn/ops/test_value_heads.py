"""Separate key and value head counts (v_BSKV with K_v != K heads) in "xla", "chunked" and
"decode": outputs and gradients against jax.nn.dot_product_attention on explicitly repeated
heads (query head n reads key head n // (N / K) and value head n // (N / K_v)); the Pallas
kernels refuse by name and "auto" falls back, logged."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from visit_case import assert_close, inputs, op, random_visits, value_and_grads

from jaxattn import dot_product_attention as attention
from jaxattn import masks
from jaxattn.ops import ChunkedBlockSizes, DecodeBlockSizes

TOL = dict(atol=5e-5, rtol=5e-5)


def _repeated(N, mask=None, **kw):
    """jax.nn on k and v repeated to N heads: the plain outside reference."""

    def fn(q, k, v):
        k = jnp.repeat(k, N // k.shape[2], axis=2)
        v = jnp.repeat(v, N // v.shape[2], axis=2)
        if v.shape[-1] == q.shape[-1]:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, **kw)
        # jax.nn needs V == H: the same softmax written out (fp32, highest precision)
        s = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") / np.sqrt(q.shape[-1])
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        return jnp.einsum("bnts,bsnv->btnv", p, v, precision="highest")

    return fn


# (N, K, K_v, V) with H = 16: value heads nested in key heads and the reverse, neither
# (6 = lcm(2, 3)), MLA-like (one key head, a value head per query head) and one value head;
# Sigma DiffQKV's different K and V head dims (V = 24 wider, V = 8 thinner than the keys)
HEADS = [(8, 2, 4, 16), (8, 4, 2, 24), (6, 2, 3, 8), (4, 1, 4, 16), (8, 8, 1, 16)]


@pytest.mark.parametrize(
    "N, K, Kv, V", HEADS, ids=[f"n{n}_k{k}_kv{kv}_v{v}" for n, k, kv, v in HEADS]
)
def test_xla_and_chunked_match_repeated_heads(N, K, Kv, V):
    B, T, S, H = 2, 37, 50, 16
    q, k, v, do = inputs(N + K, B, T, S, N, K, H, V, Kv=Kv)
    dense = jnp.asarray(np.tri(T, S, S - T, dtype=bool))
    want = value_and_grads(_repeated(N, mask=dense), q, k, v, do)
    impls = [("xla", {}), ("chunked", dict(block_sizes=ChunkedBlockSizes(block_q=16, block_kv=16)))]
    if K == 1:  # and the one-block path (no loops)
        impls.append(("chunked", {}))
    for impl, kw in impls:
        got = value_and_grads(op(impl, mask=masks.Causal(), q_offset=S - T, **kw), q, k, v, do)
        assert_close(got[0], want[0], TOL, f"{impl} o")
        for name, g, w in zip(("dq", "dk", "dv"), got[2], want[2]):
            assert_close(g, w, TOL, f"{impl} {name}")


@pytest.mark.parametrize("N, K, Kv, V", [(8, 2, 4, 16), (6, 3, 2, 24)])
def test_decode_matches_repeated_heads(N, K, Kv, V):
    B, T, S, H = 2, 2, 70, 16
    q, k, v, do = inputs(N, B, T, S, N, K, H, V, Kv=Kv)
    lengths = jnp.array([70, 33], jnp.int32)
    dense = np.arange(S)[None, None, :] <= (
        np.asarray(lengths)[:, None, None] - T + np.arange(T)[:, None]
    )
    want = value_and_grads(_repeated(N, mask=jnp.asarray(dense[:, None])), q, k, v, do)
    kw = dict(mask=masks.Causal(), q_offset=lengths - T, kv_lengths=lengths)
    got = value_and_grads(
        op("decode", block_sizes=DecodeBlockSizes(block_kv=16), **kw), q, k, v, do
    )
    assert_close(got[0], want[0], TOL, "o")
    for name, g, w in zip(("dq", "dk", "dv"), got[2], want[2]):
        assert_close(g, w, TOL, name)


def test_per_head_visits_with_separate_value_heads():
    """Per-kv-head lists with K = 2, K_v = 3 (the value groups of lcm(2, 3) = 6 each read one
    key head's list and one value head): "chunked" equals "xla"."""
    B, T, S, N, K, Kv = 2, 30, 60, 6, 2, 3
    visits = random_visits(
        np.random.default_rng(1), Bv=B, Kv=K, T=T, S=S, block_q=10, block_kv=12, L=3
    )
    q, k, v, do = inputs(2, B, T, S, N, K, 16, 8, Kv=Kv)
    kw = dict(block_visits=visits, return_lse=True)
    want = value_and_grads(op("xla", **kw), q, k, v, do)
    got = value_and_grads(op("chunked", **kw), q, k, v, do)
    for name, g, w in zip(
        ("o", "lse", "dq", "dk", "dv"), (*got[:2], *got[2]), (*want[:2], *want[2])
    ):
        assert_close(g, w, TOL, name)
    short = random_visits(
        np.random.default_rng(2), Bv=B, Kv=K, T=2, S=S, block_q=10, block_kv=12, L=3
    )
    with pytest.raises(NotImplementedError, match="per-head visit lists"):
        attention(q[:, :2], k, v, block_visits=short, implementation="decode")


def test_kernels_refuse_and_auto_falls_back(monkeypatch, caplog):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, _ = inputs(0, 1, 16, 16, 4, 2, 64, 64, Kv=4)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        with pytest.raises(NotImplementedError, match="separate key and value head counts"):
            attention(q, k, v, implementation="pallas_tpu")
        with pytest.raises(NotImplementedError, match="separate key and value head counts"):
            attention(q[:, :1], k, v, implementation="pallas_tpu_decode")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # what "auto" sees on a TPU
    with caplog.at_level(logging.WARNING, logger="jaxattn"):
        got = attention(q, k, v)
    assert "separate key and value head counts" in caplog.text
    assert_close(got, attention(q, k, v, implementation="xla"), TOL)


def test_bad_value_heads_raise():
    q = jnp.zeros((1, 4, 6, 8))
    k = jnp.zeros((1, 5, 2, 8))
    with pytest.raises(ValueError, match="value heads=4"):
        attention(q, k, jnp.zeros((1, 5, 4, 8)))
    with pytest.raises(ValueError, match="agree on seq"):
        attention(q, k, jnp.zeros((1, 6, 3, 8)))
