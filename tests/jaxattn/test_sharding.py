"""jaxattn.sharding: the logical-axis rules table, meshes and activation constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxattn import sharding


def test_rules_map_logical_names_to_present_mesh_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("batch", "length", "act_heads", None), mesh) == P(
        ("data", "fsdp"), None, "tensor", None
    )  # no "sequence" axis in this mesh: replicated
    assert sharding.logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
    # a mesh axis is used at most once per spec: the second "tensor" dim is replicated
    assert sharding.logical_to_spec(("heads", "kv_heads"), mesh) == P("tensor", None)
    assert sharding.logical_to_spec(("batch",), sharding.make_mesh({"data": 8})) == P("data")
    assert all(isinstance(k, str) for k in sharding.LOGICAL_RULES)


def test_unknown_name_and_bad_meshes_raise():
    with pytest.raises(ValueError, match="'emb' is not in the rules table"):
        sharding.logical_to_spec(("emb",))
    with pytest.raises(ValueError, match="needs 6 devices, but 8"):
        sharding.make_mesh({"data": 2, "tensor": 3})
    with pytest.raises(ValueError, match="not among"):
        sharding.make_mesh({"model": 8})


def test_mesh_axes_are_auto_and_shard_a_jitted_computation():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4)
    spec = sharding.logical_sharding(("batch", None, "act_heads"), mesh)
    y = jax.jit(
        lambda x: sharding.constrain(x * 2, ("batch", None, "act_heads"), mesh), out_shardings=spec
    )(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    # outside a mesh context and with no mesh given, constrain is a no-op
    assert sharding.constrain(x, ("batch", None, None)) is x


def test_dims_the_mesh_axes_do_not_divide_are_replicated():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    kv = ("embed", "kv_heads", "head_dim")
    assert sharding.logical_to_spec(kv, mesh) == P("fsdp", "tensor", None)  # no shape: as named
    # one shared kv head (MQA, LAMA) cannot split over tensor = 2: replicated, embed still split
    assert sharding.logical_to_spec(kv, mesh, shape=(64, 1, 16)) == P("fsdp", None, None)
    assert sharding.logical_to_spec(kv, mesh, shape=(63, 4, 16)) == P(None, "tensor", None)
    # a tuple of axes keeps its leading axes whose sizes multiply to a divisor
    assert sharding.logical_to_spec(("batch", None), mesh, shape=(6, 3)) == P("data", None)
    assert sharding.logical_to_spec(("batch", None), mesh, shape=(8, 3)) == P(
        ("data", "fsdp"), None
    )
    spec = sharding.logical_sharding(kv, mesh, shape=(64, 1, 16))
    x = jax.device_put(np.ones((64, 1, 16), np.float32), spec)  # placeable, unlike the unshaped
    assert x.sharding.spec == P("fsdp", None, None)
    with pytest.raises(ValueError, match=r"shape=\(64, 1\) has 2 dims"):
        sharding.logical_to_spec(kv, mesh, shape=(64, 1))
