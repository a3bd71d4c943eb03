"""The call context: rng-driven dropout, per-sequence ids reaching every Linear, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import lowrank
from jaxattn.layers import AdapterParam, Context
from models import DecoderLM, get_config

TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)


@nnx.jit
def _forward(model, tokens, rng):
    return model(tokens, rng=rng)


@pytest.mark.parametrize("field", ["residual_dropout", "attention_dropout"])
def test_dropout_is_deterministic_given_the_key_and_off_without_one(field):
    config = get_config("llama-tiny", implementation="xla", **{field: 0.3})
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    plain = DecoderLM(get_config("llama-tiny", implementation="xla"), rngs=nnx.Rngs(0))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, b, c = (np.asarray(_forward(model, TOKENS, k)) for k in (k1, k1, k2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # no key: evaluation, identical to the model without dropout
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(plain(TOKENS)))
    assert not np.allclose(a, np.asarray(plain(TOKENS)))


def test_residual_dropout_scales_kept_values():
    from jaxattn.layers import dropout

    x = jnp.ones((4096,))
    y = dropout(x, 0.25, jax.random.key(0))
    kept = np.asarray(y) != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    assert dropout(x, 0.25, None) is x


class SequenceScale(nnx.Module):
    """A test-local adapter reading ``ctx.sequence_ids_B``: row b's output scaled by id + 1."""

    def __init__(self, linear):
        self.unused = AdapterParam(jnp.zeros(()))

    def delta(self, x, ctx, *, base):
        y = jnp.tensordot(x, base, axes=1)
        scale = (ctx.sequence_ids_B.astype(y.dtype) + 1.0).reshape(-1, *([1] * (y.ndim - 1)))
        return y * (scale - 1.0)

    def delta_kernel(self, base):
        raise NotImplementedError("depends on the sequence id")


def test_sequence_ids_reach_every_linear():
    model = DecoderLM(get_config("llama-tiny"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 4, 64))
    head = model.lm_head
    base = np.asarray(head(x))
    lowrank.attach(model, "^lm_head$", lambda p, lin: SequenceScale(lin))
    ctx = Context.create(2, 4, sequence_ids_B=jnp.array([0, 2]))
    got = np.asarray(head(x, ctx))
    np.testing.assert_allclose(got[0], base[0], atol=1e-6)
    np.testing.assert_allclose(got[1], 3 * base[1], atol=1e-5)
    # through the whole model: row 1's logits are the base head's times 3
    logits = model(TOKENS, sequence_ids_B=jnp.array([0, 2]))
    ref = DecoderLM(get_config("llama-tiny"), rngs=nnx.Rngs(0))(TOKENS)
    np.testing.assert_allclose(logits[1], 3 * ref[1], rtol=1e-4, atol=1e-5)


def test_context_fields_are_checked():
    with pytest.raises(ValueError, match=r"positions_BT has shape \(2, 3\), expected \(2, 8\)"):
        Context.create(2, 8, positions_BT=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="sequence_ids_B must be an int array"):
        Context.create(2, 8, sequence_ids_B=jnp.zeros((2,)))
    with pytest.raises(ValueError, match="rng must be"):
        Context.create(2, 8, rng=jnp.zeros((3,)))
    ctx = Context.create(2, 8, rng=jax.random.key_data(jax.random.key(0)))
    assert jnp.issubdtype(ctx.rng.dtype, jax.dtypes.prng_key)
    # per-layer keys differ, and differ per site
    k = [ctx.at_layer(i).key(t) for i in (0, 1) for t in (1, 2)]
    assert len({tuple(np.asarray(jax.random.key_data(x))) for x in k}) == 4
