"""Titans memory as a layer (jaxattn.layers.TitansMemory; the op is tested in ops/test_titans).

* chunk size 1: the chunked forward == ``step`` over the first half then the second,
  carrying (M_t, S_t) (the decoding form: a fixed-size state);
* the layer's output == o(titans_memory(…)) on its own projections and gates, with the
  gates in their ranges (θ ∈ (0, lr_max), η, α ∈ (0, 1));
* gradients reach M_0, the gates and the projections; config errors name the field.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import TitansMemoryConfig
from jaxattn.layers._context import Context
from jaxattn.ops.titans import titans_memory

TOL = dict(atol=2e-5, rtol=2e-5)
B, T, D = 2, 8, 16


@pytest.fixture(scope="module")
def layer():
    return TitansMemoryConfig(d_model=D, num_heads=2, chunk_size=1, lr_max=0.5).build(
        rngs=nnx.Rngs(0)
    )


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((B, T, D)).astype(np.float32)


def test_forward_equals_prefill_plus_steps(layer, x):
    full = nnx.jit(lambda m, x: m(x))(layer, x)
    step = nnx.jit(lambda m, x, s: m.step(x, s))
    # two halves of 4 tokens, the second from the first's state (one step compile; a decode
    # step is the same code at T = 1)
    y0, state = step(layer, x[:, :4], layer.init_state(B))
    y1, state = step(layer, x[:, 4:], state)
    np.testing.assert_allclose(np.concatenate([y0, y1], axis=1), full, **TOL)
    assert [w.shape for w in state[0]] == [(B, 2, 8, 16), (B, 2, 16, 8)]


def test_layer_is_the_op_on_its_projections(layer, x):
    @nnx.jit
    def both(m, x):
        ctx = Context.create(B, T)
        q, k, v, lr, mom, dec = m._inputs(x, ctx)
        y, _, _ = titans_memory(q, k, v, lr, mom, dec, m.memory_weights(B), chunk_size=1)
        return m(x), m.out(y, ctx), lr, mom, dec

    got, want, lr, mom, dec = both(layer, x)
    np.testing.assert_allclose(got, want, **TOL)
    assert 0 < np.min(lr) and np.max(lr) < 0.5
    assert 0 < np.min(mom) and np.max(mom) < 1 and 0 < np.min(dec) and np.max(dec) < 1


def test_gradients_reach_memory_gates_and_projections(layer, x):
    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    grads = nnx.jit(nnx.grad(loss))(layer, x)
    flat = {"/".join(map(str, p)): np.asarray(g[...]) for p, g in nnx.to_flat_state(grads)}
    for name in ("memory_0", "memory_1", "lr/kernel", "momentum/kernel", "decay/kernel",
                 "q/kernel", "k/kernel", "v/kernel", "o/kernel"):  # fmt: skip
        assert np.all(np.isfinite(flat[name])) and np.any(flat[name] != 0), name


def test_bad_config_names_the_field():
    for kwargs, name in [
        (dict(memory_depth=0), "memory_depth"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(activation="tanh"), "activation"),
        (dict(lr_max=0.0), "lr_max"),
        (dict(num_heads=3), "num_heads"),
    ]:
        with pytest.raises(ValueError, match=name):
            TitansMemoryConfig(**{"d_model": D, "num_heads": 2, **kwargs})
