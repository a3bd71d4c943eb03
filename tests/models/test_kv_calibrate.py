"""KVQuant calibration (issue 19): per-layer nuq codebooks fitted on pre-RoPE keys and values
captured through the hooks, equal to ``fit_codebook`` on data computed here independently
(post-RoPE keys from the full forward, rotated back); the calibrated configs in ``generate``
and their logit error against the uniform datatype at the same bits."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.cache import CacheConfig
from jaxattn.cache._kvquant import split_outliers
from jaxattn.generate import generate
from jaxattn.heads import run_with_cache
from jaxattn.ops.kv_quant import fit_codebook
from jaxattn.ops.rope import apply_rope
from models import DecoderLM, get_config
from models.kv_calibrate import calibrate_kvquant, capture_pre_rope_kv

G = 4
KW = dict(group_size=G, residual=8, outliers=0.05, fp_sinks=1)


@functools.cache
def _model():
    """Two layers, so each layer's codebook is its own (built in one compile, not op by op)."""
    model = nnx.jit(lambda: DecoderLM(get_config("llama-tiny", num_layers=2), rngs=nnx.Rngs(0)))()
    calib = jax.random.randint(jax.random.key(7), (2, 32), 1, 200)
    return model, calib


def _groups(x, axis_tokens):
    """Min-max normalisation per group, written out here (keys: channel over G tokens)."""
    x = np.asarray(x, np.float64)
    if axis_tokens:
        b, t, k, h = x.shape
        x = x.reshape(b, t // G, G, k, h)
        lo, hi = x.min(2, keepdims=True), x.max(2, keepdims=True)
    else:
        b, t, k, v = x.shape
        x = x.reshape(b, t, k, v // G, G)
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0.0)


def test_codebooks_equal_fit_codebook_on_independently_captured_pre_rope_data():
    model, calib = _model()
    configs = calibrate_kvquant(model, calib, bits=3, **KW)
    assert len(configs) == 2 and all(c.datatype == "nuq" for c in configs)
    assert configs[0].codebook != configs[1].codebook  # each layer's own
    # independently: the full forward's (post-RoPE) keys, rotated back to pre-RoPE
    _, got = run_with_cache(model, calib, ["blocks.*.attn.k", "blocks.*.attn.v"])
    rope = model.layers[0].attn.config.rope
    pos = jnp.broadcast_to(jnp.arange(calib.shape[1]), calib.shape)
    pre = capture_pre_rope_kv(model, calib, group_size=G)
    for i, cfg in enumerate(configs):
        k_post, v = got[f"blocks.{i}.attn.k"], got[f"blocks.{i}.attn.v"]
        k = apply_rope(k_post, -pos, rope)  # the inverse rotation
        # the captured keys are the pre-RoPE ones (and not the rotated ones)
        np.testing.assert_allclose(pre[i][0], k, atol=1e-5)
        assert float(jnp.max(jnp.abs(pre[i][0] - k_post))) > 0.1
        np.testing.assert_allclose(pre[i][1], v, atol=1e-6)
        h = k.shape[-1]
        u_k = _groups(split_outliers(k, math.ceil(0.05 * h))[0], True)
        u_v = _groups(split_outliers(v, math.ceil(0.05 * h))[0], False)
        for book, u in zip(cfg.codebook, (u_k, u_v), strict=True):
            np.testing.assert_allclose(book, fit_codebook(jnp.asarray(u), 3), atol=1e-4)


@nnx.jit(static_argnums=2)
def _teacher_forced(model, tokens, cache_arg):
    """Prefill 8 tokens, then one per step over the caches ``cache_arg`` names."""
    cache = model.init_cache(tokens.shape[0], tokens.shape[1], jnp.float32, cache=cache_arg)
    first, cache = model.decode(tokens[:, :8], cache)

    def step(cache, tok_B):
        logits, cache = model.decode(tok_B[:, None], cache)
        return cache, logits[:, 0]

    _, rest = jax.lax.scan(step, cache, tokens[:, 8:].T)
    return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], 1)


@pytest.mark.parametrize("bits", [2, 3])
def test_calibrated_nuq_generates_and_beats_uniform_at_the_same_bits(bits):
    model, calib = _model()
    configs = calibrate_kvquant(model, calib, bits=bits, **KW)
    held = jax.random.randint(jax.random.key(3), (2, 40), 1, 200)  # not the calibration tokens
    full = nnx.jit(lambda m, t: m(t))(model, held)
    uniform = CacheConfig(format="kvquant", bits=bits, **KW)
    err = {
        name: float(jnp.sqrt(jnp.mean((_teacher_forced(model, held, arg) - full) ** 2)))
        for name, arg in (("nuq", configs), ("uniform", uniform))
    }
    assert 0 < err["nuq"] < err["uniform"], err
    # generate takes the per-layer configs: each token the argmax of the same caches' decode
    # (32 new tokens: the sequence has held's shape, so _teacher_forced is not compiled again)
    prompt, lens = held[:, :8], jnp.array([8, 8])
    out = generate(model, prompt, lens, max_new_tokens=32, rng=jax.random.key(0), cache=configs)
    seq = out.tokens_BS
    assert seq.shape == held.shape
    logits = _teacher_forced(model, seq, configs)
    np.testing.assert_array_equal(np.argmax(logits[:, 7:39], -1), seq[:, 8:40])


def test_missing_calibration_and_bad_input_name_the_field():
    model, calib = _model()
    with pytest.raises(ValueError, match=r"CacheConfig.codebook is required for datatype='nuq'"):
        generate(model, calib[:, :4], jnp.array([4, 4]), max_new_tokens=2,
                 rng=jax.random.key(0), cache={"format": "kvquant", "datatype": "nuq"})  # fmt: skip
    with pytest.raises(ValueError, match=r"tokens_BT \(2, 30\) .* multiple of group_size=4"):
        calibrate_kvquant(model, calib[:, :30], **KW)
    with pytest.raises(ValueError, match=r"CacheConfig.bits=5"):
        calibrate_kvquant(model, calib, bits=5, **KW)
    with pytest.raises(ValueError, match=r"cache has 1 per-layer configs, the model 2 layers"):
        model.init_cache(1, 8, cache=(None,))
