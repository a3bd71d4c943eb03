"""KVCache and LatentCache: ragged writes, lengths, bytes per token, while_loop carries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.cache import KVCache, LatentCache


def test_ragged_writes_land_at_each_sequence_length():
    cache = KVCache.create(batch=2, capacity=6, num_kv_heads=1, head_dim=2, dtype=jnp.float32)
    k = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 1, 2)
    cache = cache.write(k, -k).advance(jnp.array([3, 1]))  # row 1 keeps 1 of its 3 tokens
    assert cache.lengths_B.tolist() == [3, 1]
    step = jnp.full((2, 1, 1, 2), 100.0)
    cache = cache.write(step, step).advance(1)
    np.testing.assert_array_equal(cache.k_BCKH[0, :4, 0, 0], [0, 2, 4, 100])
    np.testing.assert_array_equal(cache.k_BCKH[1, :3, 0, 0], [6, 100, 10])  # pad overwritten
    assert cache.lengths_B.tolist() == [4, 2]


def test_bytes_per_token():
    gqa = KVCache.create(batch=1, capacity=4, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16)
    assert gqa.bytes_per_token() == 2 * 8 * 128 * 2
    mla = LatentCache.create(batch=1, capacity=4, kv_lora_rank=512, rope_dim=64, dtype=jnp.bfloat16)
    assert mla.bytes_per_token() == (512 + 64) * 2
    assert mla.rope_dim == 64 and mla.capacity == 4


def test_latent_cache_packs_latent_then_rope_key():
    cache = LatentCache.create(batch=1, capacity=3, kv_lora_rank=2, rope_dim=2, dtype=jnp.float32)
    cache = cache.write(jnp.ones((1, 1, 2)), 2 * jnp.ones((1, 1, 2))).advance(1)
    np.testing.assert_array_equal(cache.latent_BCR[0, 0], [1, 1, 2, 2])
    with pytest.raises(ValueError, match="L=2"):
        cache.write(jnp.ones((1, 1, 3)), jnp.ones((1, 1, 2)))


def test_caches_are_while_loop_carries():
    cache = LatentCache.create(batch=2, capacity=8, kv_lora_rank=3, rope_dim=2, dtype=jnp.float32)

    def body(i, c):
        return c.write(jnp.full((2, 1, 3), i, jnp.float32), jnp.zeros((2, 1, 2))).advance(1)

    out = jax.jit(lambda c: jax.lax.fori_loop(0, 5, body, c))(cache)
    assert out.lengths_B.tolist() == [5, 5]
    np.testing.assert_array_equal(out.latent_BCR[1, :5, 0], np.arange(5))


def test_bad_create_and_shapes():
    with pytest.raises(ValueError, match="capacity"):
        KVCache.create(batch=1, capacity=0, num_kv_heads=1, head_dim=2)
    cache = KVCache.create(batch=1, capacity=2, num_kv_heads=2, head_dim=2)
    with pytest.raises(ValueError, match="do not match"):
        cache.write(jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 1, 2)))
