"""The "pgqa" kind (Perturbed GQA, PAPERS.md §1 "KDGQA / DGQA / PGQA"): faithful tests.

* noise off (evaluation: no ctx.rng) == the "mha" kind with K kv heads (uniform GQA), bitwise;
* in training the subtracted noise has, per (batch, token, head) row, exactly the row's mean and
  unbiased std, so the perturbed row has mean 0; the standardised noise is uniform (kurtosis
  1.8, not a Gaussian's 3), different per key, and the layer output is the o projection of the
  perturbed heads;
* DecoderLM (``pgqa-tiny``): prefill + N decode steps == the full forward; HF export refuses;
  bad input names the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.layers import AttentionConfig, PGQAConfig
from jaxattn.layers._context import Context
from models import DecoderLM, get_config

D, N, K, T, B = 32, 8, 2, 16, 2
KW = dict(d_model=D, num_heads=N, num_kv_heads=K, head_dim=16, implementation="xla")


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, D)), jnp.float32)


@pytest.fixture(scope="module")
def layers():
    return PGQAConfig(**KW).build(rngs=nnx.Rngs(0)), AttentionConfig(**KW).build(rngs=nnx.Rngs(0))


def test_noise_off_is_uniform_gqa_bitwise(layers):
    pgqa, gqa = layers
    x = _x()
    np.testing.assert_array_equal(pgqa(x), gqa(x))
    np.testing.assert_array_equal(pgqa(x, Context.create(B, T)), gqa(x))


def _train_heads(layer, x, seed):
    """(clean o_BTNV, perturbed o_BTNV, layer output) of one training forward."""
    ctx = Context.create(B, T, rng=jax.random.key(seed))
    o = layer.attend(*layer.qk_transform(*layer.project(x, ctx), ctx), ctx)
    return o, layer.head_gate(o, ctx, x), layer(x, ctx)


def test_training_noise_has_the_rows_mean_and_std(layers):
    pgqa, _ = layers
    x = _x(1)
    o, perturbed, out = _train_heads(pgqa, x, seed=0)
    o64, noise = np.asarray(o, np.float64), np.asarray(o - perturbed, np.float64)
    np.testing.assert_allclose(noise.mean(-1), o64.mean(-1), atol=1e-6)
    np.testing.assert_allclose(noise.std(-1, ddof=1), o64.std(-1, ddof=1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(perturbed).mean(-1), 0.0, atol=1e-6)
    z = (noise - noise.mean(-1, keepdims=True)) / noise.std(-1, keepdims=True)
    kurtosis = float(np.mean(z**4))  # uniform 1.8 (V = 16: a little below), Gaussian 3
    assert 1.5 < kurtosis < 2.1, kurtosis
    np.testing.assert_allclose(out, pgqa.out(perturbed, None), rtol=1e-5, atol=1e-6)
    _, other, _ = _train_heads(pgqa, x, seed=1)
    assert not np.allclose(other, perturbed, atol=1e-4)  # another key, another noise


def test_constant_rows_give_zeros_and_finite_gradients():
    """A fully masked query's output row is 0 (constant): o' = 0 and the gradient is finite."""
    from jaxattn.layers._pgqa import pgqa_noise

    o = jnp.asarray(np.random.default_rng(2).normal(size=(1, 3, 2, 16)), jnp.float32)
    o = o.at[0, 1].set(0.0).at[0, 2, 0].set(0.7)
    f = lambda o: jnp.sum(jnp.square(o - pgqa_noise(o, jax.random.key(0))))
    # one compile for the value, its gradient and the perturbed rows (not op by op)
    value, grad, perturbed = jax.jit(
        lambda o: (*jax.value_and_grad(f)(o), o - pgqa_noise(o, jax.random.key(0)))
    )(o)
    perturbed = np.asarray(perturbed)
    np.testing.assert_allclose(perturbed[0, 1], 0.0, atol=1e-7)
    np.testing.assert_allclose(perturbed[0, 2, 0], 0.0, atol=1e-6)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


@pytest.fixture(scope="module")
def model():
    return DecoderLM(get_config("pgqa-tiny", implementation="xla", num_layers=1), rngs=nnx.Rngs(0))


def test_decoder_prefill_and_steps_equal_forward(model):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(decode_all(model, tokens), full, atol=2e-5, rtol=2e-5)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="PGQAConfig: v_head_dim=1 must be >= 2"):
        PGQAConfig(d_model=D, num_heads=N, v_head_dim=1)
