"""GaLore state shardings from the parameters' specs; a 2x2x2 mesh gives the 1-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxattn import optim, sharding

SPECS = {
    "w1": ((64, 96), P("fsdp", "tensor")),
    "w2": ((96, 64), P("tensor", "fsdp")),
    "w3": ((32, 4, 16), P("fsdp", "tensor", None)),  # viewed as [32, 64], columns ("tensor")
    "b": ((96,), P("tensor")),
}


def _setup():
    rng = np.random.default_rng(0)  # numpy draws: no eager jax.random programs
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, (s, _) in SPECS.items()}
    specs = {k: spec for k, (_, spec) in SPECS.items()}
    tx = optax.chain(
        optim.galore(optax.scale_by_adam(), rank=8, update_proj_gap=2),
        optax.scale(-1e-2),
    )
    return params, specs, tx


def test_state_specs_follow_the_parameter_dims_they_keep():
    params, specs, tx = _setup()
    state_specs = optim.state_partition_specs(jax.eval_shape(tx.init, params), params, specs)
    galore_specs = state_specs[0]
    assert galore_specs.count == P()
    # w1 [64, 96]: std projects the smaller (left) side: P [64, 8], moments [8, 96]
    assert galore_specs.left["w1"] == P("fsdp", None)
    assert galore_specs.inner.mu["w1"] == P(None, "tensor")
    # w2 [96, 64]: right side: Q [8, 64], moments [96, 8]
    assert galore_specs.right["w2"] == P(None, "fsdp")
    assert galore_specs.inner.nu["w2"] == P("tensor", None)
    # w3 [32, 4, 16] -> [32, 64]: the merged column dim keeps "tensor" (its leading dim's axis)
    assert galore_specs.left["w3"] == P("fsdp", None)
    assert galore_specs.inner.mu["w3"] == P(None, "tensor")
    # a leaf that is not projected keeps its parameter's spec
    assert galore_specs.inner.mu["b"] == P("tensor")
    assert optim.state_spec(P(None, "tensor", "fsdp"), (32, 4, 16), (8, 64)) == P(None, None)


def test_quantised_codes_shard_like_the_moment_they_store():
    params, specs, _ = _setup()
    inner = optim.quantize_state(optax.scale_by_adam(), min_size=512)
    tx = optim.galore(inner, rank=8, update_proj_gap=2)
    mu = optim.state_partition_specs(jax.eval_shape(tx.init, params), params, specs).inner.inner.mu
    assert mu["w1"] == optim.QuantizedArray(P(None, "tensor"), P(), P())
    assert mu["b"] == P("tensor")  # 96 entries: below min_size, not quantised


def test_mesh_2x2x2_equals_one_device():
    params, specs, tx = _setup()
    rng = np.random.default_rng(100)
    grads = [
        jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
        for _ in range(3)
    ]

    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    def run(params, init, step):
        state = init(params)
        for g in grads:
            params, state = step(params, state, g)
        return params, state

    want = run(params, jax.jit(tx.init), jax.jit(step))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    named = lambda t: jax.tree.map(lambda s: NamedSharding(mesh, s), t)
    p_sh = named(specs)
    s_sh = named(optim.state_partition_specs(jax.eval_shape(tx.init, params), params, specs))
    init = jax.jit(tx.init, in_shardings=(p_sh,), out_shardings=s_sh)
    sharded_step = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
    got = run(jax.device_put(params, p_sh), init, sharded_step)

    assert got[1][0].left["w1"].sharding.spec == P("fsdp", None)
    assert got[0]["w3"].sharding.spec == P("fsdp", "tensor", None)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
