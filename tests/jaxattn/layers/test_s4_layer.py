"""S4 as a layer (jaxattn.layers.S4Layer; the op's equations are in ops/test_s4).

* convolution mode (the forward: Cauchy kernel + FFT) == recurrent mode (``step`` over the
  first half, then the second from the carried [B, D, N/2] state), through GELU and W_out;
* gradients reach Λ, P, B, C̃, log Δ, D and W_out, finite; config errors name the field.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import S4Config

B, T, D, N = 2, 16, 4, 8


@pytest.fixture(scope="module")
def layer():
    return S4Config(d_model=D, state_size=N, max_length=T, dt_min=0.05, dt_max=0.2).build(
        rngs=nnx.Rngs(0)
    )


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((B, T, D)).astype(np.float32)


def test_conv_mode_equals_recurrent_mode(layer, x):
    full = np.asarray(nnx.jit(lambda m, x: m(x))(layer, x))
    step = nnx.jit(lambda m, x, s: m.step(x, s))
    y0, state = step(layer, x[:, : T // 2], layer.init_state(B))
    y1, state = step(layer, x[:, T // 2 :], state)
    assert state.shape == (B, D, N // 2)
    scale = np.abs(full).max()
    np.testing.assert_allclose(np.concatenate([y0, y1], axis=1), full, atol=3e-5 * scale, rtol=1e-4)


def test_gradients_reach_every_parameter(layer, x):
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x)))))(layer, x)
    flat = {"/".join(map(str, p)): np.asarray(g[...]) for p, g in nnx.to_flat_state(grads)}
    assert set(flat) >= {"lam_re", "lam_im", "p", "b", "c", "log_dt", "d", "out/kernel"}
    for name, g in flat.items():
        assert np.all(np.isfinite(g)) and np.any(g != 0), name


def test_bad_config_and_input_name_the_field(layer):
    for kwargs, name in [
        (dict(state_size=7), "state_size"),
        (dict(max_length=0), "max_length"),
        (dict(dt_min=0.5, dt_max=0.1), "dt_min"),
    ]:
        with pytest.raises(ValueError, match=name):
            S4Config(d_model=D, **kwargs)
    with pytest.raises(ValueError, match="max_length"):
        layer(np.zeros((1, T + 1, D), np.float32))
