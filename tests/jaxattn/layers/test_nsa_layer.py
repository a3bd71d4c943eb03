"""The "nsa" attention kind: a registered kind in a DecoderLM; prefill + steps == forward;
gradients reach the gates and the compression; config validation names the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.layers import NSAConfig, registered_kinds
from models import DecoderLM, LayerSpec, get_config

NSA = dict(cmp_block=4, cmp_stride=2, sel_block=2, top_n=4, window=4)  # free picks from t = 6


@pytest.fixture(scope="module")
def model():
    config = get_config(
        "llama-tiny", num_layers=1, layer_pattern=(LayerSpec.of("nsa", num_kv_heads=2, **NSA),)
    )
    m = DecoderLM(config, rngs=nnx.Rngs(0))
    for block in m.layers:  # non-zero position embeddings, so the test sees them
        attn = block.attn
        for name in ("k_block_pos", "v_block_pos"):
            p = getattr(attn, name)
            p[...] = 0.3 * jax.random.normal(jax.random.key(1), p.shape)
    return m


def test_registered_and_decode_equals_forward(model):
    assert "nsa" in registered_kinds()
    assert type(model.layers[0].attn.config) is NSAConfig
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 14)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(decode_all(model, tokens), full, atol=3e-5, rtol=3e-5)


def test_gradients_reach_gates_and_compression(model):
    attn = model.layers[0].attn
    x = jax.random.normal(jax.random.key(3), (1, 13, attn.config.d_model))
    graphdef, params = nnx.split(attn, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(params)
    for name in ("gate", "k_compress", "v_compress", "k_block_pos", "v_block_pos"):
        leaves = jax.tree.leaves(getattr(grads, name))
        assert max(float(jnp.abs(g).max()) for g in leaves) > 0, name


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(cmp_stride=3), "cmp_stride=3 must divide cmp_block=4"),
        (dict(top_n=2), "top_n=2 must be >= 3"),
        (dict(window=0), "window=0"),
        (dict(sliding_window=8), "not NSA options"),
    ],
)
def test_bad_config_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        NSAConfig(d_model=32, num_heads=4, **{**NSA, **kw})
