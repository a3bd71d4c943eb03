"""Quantized cache formats in models (issue 19): a format named per call reaches every layer
(mha and mla, on its own policy), generate takes it by name and stays opaque to it (one
format by default, each format in the slow tier)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.cache import (
    CacheConfig,
    MixedPrecisionKVCache,
    QuantizedKVCache,
    QuantizedLatentCache,
)
from jaxattn.generate import generate
from models import DecoderLM, LayerSpec, get_config

KIVI8 = {"format": "kivi", "bits": 8, "group_size": 4, "residual": 8}
KVQUANT8 = {"format": "kvquant", "bits": 8, "group_size": 4, "residual": 8, "outliers": 0.1,
            "fp_sinks": 2}  # fmt: skip
GEAR8 = {"format": "gear", "bits": 8, "group_size": 4, "residual": 8, "outliers": 0.1, "rank": 2}


@nnx.jit(static_argnums=2)
def _decode_steps(model, tokens, fields):
    """One token per step (one compiled decode step; multi-token writes are the cache tests'),
    with the caches ``fields`` name: logits [B, T, V]."""
    cache = model.init_cache(tokens.shape[0], 32, jnp.float32, cache=dict(fields))

    def step(cache, tok_B):
        logits, cache = model.decode(tok_B[:, None], cache)
        return cache, logits[:, 0]

    _, logits = jax.lax.scan(step, cache, tokens.T)
    return jnp.swapaxes(logits, 0, 1)


@functools.cache
def _tiny(name):
    """A one-layer model, 15 tokens (the length of the generated sequences below, so
    _decode_steps compiles once per format) and the full forward's logits; built once."""
    model = DecoderLM(get_config(name, num_layers=1), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 15), 1, 200)
    return model, tokens, nnx.jit(lambda m, t: m(t))(model, tokens)


def _generate_is_the_argmax_of_decode(model, fields):
    """generate with the format by name: every token is the argmax of the model's own decode
    over the same quantized caches (generate never looks inside them)."""
    prompt, lens = jnp.array([[5, 6, 7, 8, 9], [9, 10, 11, 12, 13]]), jnp.array([5, 5])
    out = generate(model, prompt, lens, max_new_tokens=10, rng=jax.random.key(0), cache=fields)
    seq = out.tokens_BS[:, :15]
    logits = _decode_steps(model, seq, tuple(fields.items()))
    np.testing.assert_array_equal(np.argmax(logits[:, 4:14], -1), seq[:, 5:15])


@pytest.mark.parametrize("name", ["llama-tiny", "deepseek-tiny"])
def test_kivi_caches_decode_close_to_the_full_forward(name):
    model, tokens, full = _tiny(name)
    got = _decode_steps(model, tokens, tuple(KIVI8.items()))
    # 8-bit codes: the logits move by a small fraction of their spread
    assert float(jnp.max(jnp.abs(got - full))) < 0.02 * float(jnp.std(full))
    caches = model.init_cache(2, 32, cache=KIVI8)
    kind = QuantizedKVCache if name == "llama-tiny" else QuantizedLatentCache
    assert isinstance(caches[0], kind)


def test_generate_takes_a_format_by_name():
    _generate_is_the_argmax_of_decode(_tiny("llama-tiny")[0], KIVI8)


# generate is opaque to the format: test_generate_takes_a_format_by_name covers it by default,
# and each format's decode in a model has its own default case below
@pytest.mark.slow
@pytest.mark.parametrize("name,fields", [
    ("deepseek-tiny", KIVI8), ("llama-tiny", KVQUANT8), ("llama-tiny", GEAR8),
], ids=["kivi-mla", "kvquant", "gear"])  # fmt: skip
def test_generate_by_name_with_each_format(name, fields):
    _generate_is_the_argmax_of_decode(_tiny(name)[0], fields)


def test_a_format_combines_with_each_layers_policy_and_bad_fields_name_the_layer():
    ring = CacheConfig(policy="sink_window", sink=4, window=8)
    specs = (LayerSpec.of("mha", cache=ring), LayerSpec.of("mha"))
    # abstract models: the caches and the errors need the configs only, not the weights
    model = nnx.eval_shape(lambda: DecoderLM(get_config("llama-tiny", layer_specs=specs),
                                             rngs=nnx.Rngs(0)))  # fmt: skip
    caches = jax.eval_shape(lambda: model.init_cache(1, 64, cache=KIVI8))
    assert caches[0].window == 8 and caches[0].capacity == 12 and caches[1].capacity == 64
    with pytest.raises(ValueError, match=r"layer 0 cache .*group_size=8 must divide .*sink=4"):
        model.init_cache(1, 64, cache=dict(KIVI8, group_size=8))
    hybrid = nnx.eval_shape(lambda: DecoderLM(get_config("linear-hybrid-tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"cannot serve cache.format='kivi'"):
        generate(hybrid, jnp.ones((1, 3), jnp.int32), jnp.array([3]), max_new_tokens=2,
                 rng=jax.random.key(0), cache=KIVI8)  # fmt: skip


MIKV_ALL_HIGH = {"format": "mikv", "bits": 2, "group_size": 4, "residual": 8, "important": 32}


def test_mikv_and_kvquant_by_name_reach_the_layers_and_train_sample():
    from jaxattn.cache import KVQuantCache
    from train.sample import cache_fields

    model, mla = _tiny("llama-tiny")[0], _tiny("deepseek-tiny")[0]
    for fields, kind in ((MIKV_ALL_HIGH, MixedPrecisionKVCache), (KVQUANT8, KVQuantCache)):
        assert isinstance(jax.eval_shape(lambda f=fields: model.init_cache(1, 32, cache=f))[0],
                          kind)  # fmt: skip
        with pytest.raises(ValueError, match=rf"cannot serve cache.format='{fields['format']}'"):
            mla.init_cache(1, 32, cache=fields)
    # train.sample's --set cache.FIELD=VALUE reaches the same fields
    items = [f"cache.{k}={v}" for k, v in MIKV_ALL_HIGH.items()] + ["cache.saliency=normalized"]
    assert cache_fields(items) == dict(MIKV_ALL_HIGH, saliency="normalized")
    assert cache_fields([f"cache.{k}={v}" for k, v in KVQUANT8.items()]) == KVQUANT8


# the decode of these formats in a model, in the slow tier: by default their caches' own
# decode tests (test_mixed_precision_cache's test_every_token_at_high_precision_is_the_dense_
# cache, test_kvquant_cache's layer decode test) and this file's kivi / gear model decodes
@pytest.mark.slow
def test_mikv_in_a_model_all_high_precision_is_the_full_forward():
    model, tokens, full = _tiny("llama-tiny")
    # a table as large as the capacity: every token in full precision (2-bit codes unused)
    got = _decode_steps(model, tokens, tuple(MIKV_ALL_HIGH.items()))
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-4 * float(jnp.std(full)))


@pytest.mark.slow
def test_kvquant_in_a_model_decodes_close_to_the_full_forward():
    model, tokens, full = _tiny("llama-tiny")
    got = _decode_steps(model, tokens, tuple(KVQUANT8.items()))
    # pre-RoPE 8-bit keys rotated by the cache: the logits move by a small fraction only
    err = float(jnp.max(jnp.abs(got - full)))
    assert 0 < err < 0.02 * float(jnp.std(full)), err


def test_gear_by_name_in_a_model_decodes_close_to_the_full_forward():
    from jaxattn.cache import GearCache
    from train.sample import cache_fields

    model, tokens, full = _tiny("llama-tiny")
    got = _decode_steps(model, tokens, tuple(GEAR8.items()))
    # 8-bit backbone + rank-2 residual + outliers: a small fraction of the logits' spread
    err = float(jnp.max(jnp.abs(got - full)))
    assert 0 < err < 0.02 * float(jnp.std(full)), err
    assert isinstance(jax.eval_shape(lambda: model.init_cache(1, 32, cache=GEAR8))[0],
                      GearCache)  # fmt: skip
    # train.sample's --set cache.format=gear cache.rank=2 ... reaches the same fields
    assert cache_fields([f"cache.{k}={v}" for k, v in GEAR8.items()]) == GEAR8
    with pytest.raises(ValueError, match=r"cannot serve cache.format='gear'"):
        _tiny("deepseek-tiny")[0].init_cache(1, 32, cache=GEAR8)
