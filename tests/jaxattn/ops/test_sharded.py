"""jaxattn.ops.sharded on 8 fake CPU devices: sharded decode/attention == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding

from jaxattn.ops.sharded import attention_specs, shard_attention, sharded_decode_attention
from jaxattn.sharding import make_mesh
from pallas_kernels.decode_attention import (
    DecodeKernelBlockSizes,
    decode_attention_reference,
    decode_attention_tpu,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _inputs(B, T, N, K, H, V, C, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32)
    k = jax.random.normal(kk, (B, C, K, H), jnp.float32)
    v = jax.random.normal(kv, (B, C, K, V), jnp.float32)
    return q, k, v


def _place(mesh, args, specs):
    return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]


def test_decode_kernel_data2_tensor4_g2_t1_matches_unsharded():
    mesh = make_mesh({"data": 2, "tensor": 4})
    kwargs = dict(
        block_sizes=DecodeKernelBlockSizes(block_kv=16, num_splits=2),
        return_lse=True,
        interpret=pltpu.InterpretParams(),
    )
    q, k, v = _inputs(B=2, T=1, N=8, K=4, H=64, V=64, C=40)
    lens = jnp.array([40, 9], jnp.int32)
    in_specs, _ = attention_specs(mesh, [1], with_lse=True)
    args = _place(mesh, (q, k, v, lens), in_specs)
    o, lse = jax.jit(sharded_decode_attention(mesh, **kwargs))(*args)
    want_o, want_lse = decode_attention_tpu(q, k, v, lens, **kwargs)
    assert o.sharding.spec == in_specs[0]
    np.testing.assert_allclose(np.asarray(o), np.asarray(want_o), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=1e-5, rtol=1e-5)


def test_generic_fn_data2_fsdp2_tensor2_g4_t3_matches_unsharded():
    # Any per-device fn with the [B, T, N, H] layouts works; here the jnp reference.
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    fn = lambda q, k, v, lens: decode_attention_reference(q, k, v, lens, window=7)
    q, k, v = _inputs(B=4, T=3, N=16, K=4, H=32, V=16, C=24)
    lens = jnp.array([24, 0, 3, 11], jnp.int32)
    in_specs, _ = attention_specs(mesh, [1])
    assert in_specs[0][0] == ("data", "fsdp") and in_specs[0][2] == "tensor"
    o = jax.jit(shard_attention(fn, mesh))(*_place(mesh, (q, k, v, lens), in_specs))
    np.testing.assert_allclose(np.asarray(o), np.asarray(fn(q, k, v, lens)), atol=1e-5, rtol=1e-5)


def test_kv_heads_not_divisible_by_tensor_raises():
    mesh = make_mesh({"data": 2, "tensor": 4})
    q, k, v = _inputs(B=2, T=1, N=4, K=2, H=32, V=32, C=8)
    with pytest.raises(ValueError, match="divisible by the tensor axis size 4"):
        shard_attention(lambda q, k, v, lens: q, mesh)(q, k, v, jnp.array([8, 8]))


def test_batch_not_divisible_raises():
    mesh = make_mesh({"data": 2, "tensor": 4})
    q, k, v = _inputs(B=3, T=1, N=4, K=4, H=32, V=32, C=8)
    with pytest.raises(ValueError, match="batch shards 2"):
        shard_attention(lambda q, k, v, lens: q, mesh)(q, k, v, jnp.array([8, 8, 8]))
