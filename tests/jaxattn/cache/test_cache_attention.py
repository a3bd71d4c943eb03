"""Caches own attention: update_and_attend against the op, the sink + window ring against the
Λ mask far past its size, explicit key positions, capacity overflow, CacheConfig. (The latent
cache's ring: tests/models/test_cache_policies.py, through the mla layer.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from jaxattn import dot_product_attention
from jaxattn.cache import CacheConfig, KVCache
from jaxattn.masks import Causal, SinkWindow

B, N, K, H = 2, 4, 2, 8
OP = dict(mask=Causal(), implementation="xla")  # the reference op: quick to compile


def _qkv(seed, length, kv=K, v_dim=H):
    q, k, v = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(q, (B, length, N, H)),
        jax.random.normal(k, (B, length, K, H)),
        jax.random.normal(v, (B, length, kv, v_dim)),
    )


def _op(q, k, v, mask):
    """The reference: the op on the whole sequence ("xla"), compiled once per call site."""
    return jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=mask, implementation="xla"))(
        q, k, v
    )


def _feed(cache, q, k, v, chunks, *, num_new=None):
    """update_and_attend over consecutive chunks of the sequence -> outputs [B, L, N, V]."""
    step = jax.jit(lambda c, q, k, v, n: c.update_and_attend(q, k, v, num_new_B=n, **OP))
    outs, at = [], 0
    for t in chunks:
        o, cache = step(cache, q[:, at : at + t], k[:, at : at + t], v[:, at : at + t], num_new)
        outs.append(o)
        at += t
    return jnp.concatenate(outs, 1), cache


def test_full_cache_update_and_attend_equals_the_op(kv_v=1):
    q, k, v = _qkv(0, 12, kv=kv_v, v_dim=6)
    cache = KVCache.create(
        batch=B, capacity=16, num_kv_heads=K, head_dim=H, v_head_dim=6, num_v_heads=kv_v,
        dtype=jnp.float32,
    )  # fmt: skip
    got, cache = _feed(cache, q, k, v, [6] + [1] * 6)
    want = _op(q, k, v, Causal())
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert cache.lengths_B.tolist() == [12, 12]
    assert cache.bytes_per_token() == (K * H + kv_v * 6) * 4
    np.testing.assert_array_equal(cache.key_positions_BC()[0], [*range(12), -1, -1, -1, -1])


def test_sink_window_ring_equals_full_attention_under_the_sink_window_mask():
    # multi-token writes before and after the ring wraps, then single steps
    chunks = [3, 1, 1, 6, 1, 4] + [1] * 24
    sink, window, length = 3, 5, sum(chunks)  # length 40 >> sink + window = 8 slots
    q, k, v = _qkv(1, length)
    ring = KVCache.create(
        batch=B, capacity=4, num_kv_heads=K, head_dim=H, dtype=jnp.float32,
        config=CacheConfig(policy="sink_window", sink=sink, window=window),
    )  # fmt: skip
    got, ring2 = _feed(ring, q, k, v, chunks)
    want = _op(q, k, v, SinkWindow(sinks=sink, window=window))
    np.testing.assert_allclose(got, want, atol=2e-5)
    # constant memory: the same 8 slots and bytes per token however long the sequence
    assert ring2.k_BCKH.shape == ring.k_BCKH.shape == (B, sink + window, K, H)
    assert ring2.bytes_per_token() == ring.bytes_per_token() == 2 * K * H * 4
    assert ring2.lengths_B.tolist() == [length] * B and ring2.max_positions is None


def test_ring_key_positions_and_ragged_padding_is_not_stored():
    cfg = CacheConfig(policy="sink_window", sink=2, window=3)
    ring = KVCache.create(batch=2, capacity=1, num_kv_heads=1, head_dim=1, config=cfg)
    k = jnp.arange(2 * 7, dtype=jnp.float32).reshape(2, 7, 1, 1)
    ring = jax.jit(lambda r, n: r.write(k, k, num_new_B=n).advance(n))(ring, jnp.array([7, 3]))
    # row 0 holds positions 0, 1 (sinks) and 4, 5, 6 in ring slots 2 + (p - 2) % 3
    np.testing.assert_array_equal(ring.key_positions_BC(), [[0, 1, 5, 6, 4], [0, 1, 2, -1, -1]])
    np.testing.assert_array_equal(ring.k_BCKH[0, :, 0, 0], [0, 1, 5, 6, 4])
    np.testing.assert_array_equal(ring.k_BCKH[1, :, 0, 0], [7, 8, 9, 0, 0])  # no padding
    ring.check_room(10**9)  # a ring never overflows


def test_attention_runs_in_the_storage_dtype_without_casting_the_cache():
    q, k, v = _qkv(4, 6)
    cache = KVCache.create(batch=B, capacity=8, num_kv_heads=K, head_dim=H, dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda c: c.update_and_attend(q, k, v, mask=Causal()))(cache)
    casts = [
        e
        for e in jaxpr.eqns
        if e.primitive.name == "convert_element_type" and e.invars[0].aval.shape[1:2] == (8,)
    ]
    assert not casts, casts  # nothing of the cache's [B, C, ...] shape is converted
    o, cache = jax.jit(lambda c: c.update_and_attend(q, k, v, **OP))(cache)
    assert o.dtype == jnp.float32 and cache.k_BCKH.dtype == jnp.bfloat16
    want = _op(q, k, v, Causal())
    np.testing.assert_allclose(o, want, atol=5e-2)


def test_full_cache_overflow_is_an_error_before_the_write():
    q, k, v = _qkv(5, 16)
    cache = KVCache.create(batch=B, capacity=8, num_kv_heads=K, head_dim=H, dtype=jnp.float32)
    with pytest.raises(ValueError, match="16 new tokens .* capacity=8"):
        cache.update_and_attend(q, k, v, mask=Causal())
    with pytest.raises(ValueError, match="16 new tokens .* capacity=8"):  # static: inside jit
        jax.jit(lambda c: c.update_and_attend(q, k, v, mask=Causal()))(cache)
    step = jax.jit(lambda c, q, k, v: c.update_and_attend(q, k, v, **OP))
    _, full = step(cache, q[:, :8], k[:, :8], v[:, :8])
    one = (q[:, 8:9], k[:, 8:9], v[:, 8:9])
    with pytest.raises(ValueError, match=r"lengths_B=\[8, 8\] plus \[1, 1\] .*capacity=8"):
        full.update_and_attend(*one, mask=Causal())
    err, _ = checkify.checkify(step)(full, *one)
    with pytest.raises(checkify.JaxRuntimeError, match="cache overflow.*capacity=8"):
        err.throw()
    # unchecked under jit: defined, NaN for the overflowing rows, no slot clamped over
    o, after = step(full.with_lengths(jnp.array([8, 3])), *one)
    assert np.isnan(o[0]).all() and np.isfinite(o[1]).all()
    np.testing.assert_array_equal(after.k_BCKH[0], full.k_BCKH[0])
    assert after.lengths_B.tolist() == [9, 4]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(policy="lru"), r"policy='lru' must be one of"),
        (dict(format="paged"), r"format='paged' must be one of"),
        (dict(policy="sink_window", sink=2), r"window=None must be an int >= 1"),
        (dict(policy="sink_window", sink=-1, window=4), r"sink=-1 must be >= 0"),
        (dict(window=4), r"policy='full' keeps every token"),
        (dict(dtype="int8"), r"dtype='int8' must be a floating dtype"),
        (dict(policy="sink_window", window=2.5), r"window=2.5 must be an int"),
    ],
)
def test_bad_cache_configs_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kw)


def test_cache_config_round_trips_through_json():
    cfg = CacheConfig(policy="sink_window", sink=4, window=64, dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16"
    assert CacheConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"no fields \['size'\]"):
        CacheConfig.from_dict({"size": 3})
    with pytest.raises(ValueError, match="cannot be stored in a dense cache"):
        KVCache.create(batch=1, capacity=2, num_kv_heads=1, head_dim=2,
                       config=CacheConfig(format="latent"))  # fmt: skip


def test_auto_picks_the_pallas_decode_kernel_for_full_caches_and_ring_steps(monkeypatch):
    from jaxattn.ops import _kernels

    # on a TPU backend, record which kernel "auto" runs, tracing only (its numerics:
    # tests/jaxattn/ops/test_decode_kernels.py; the cache's: the tests above)
    used = []
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(_kernels, "run", lambda impl, a, q, k, v, lse, bs: used.append(impl) or q)
    q, k, v = (jnp.zeros((B, 11, n, 64)) for n in (N, K, K))
    step = lambda c, q, k, v: c.update_and_attend(q, k, v, mask=Causal())  # noqa: E731
    for cfg in (None, CacheConfig(policy="sink_window", sink=2, window=6)):
        cache = KVCache.create(batch=B, capacity=16, num_kv_heads=K, head_dim=64,
                               dtype=jnp.float32, config=cfg)  # fmt: skip
        _, cache = jax.eval_shape(step, cache, q[:, :10], k[:, :10], v[:, :10])
        jax.eval_shape(step, cache, q[:, 10:], k[:, 10:], v[:, 10:])
    # full: prefill and step; ring: the step (its prefill's position mask is a dense array)
    assert used == ["pallas_tpu_decode"] * 3
