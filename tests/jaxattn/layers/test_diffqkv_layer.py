"""The "diffqkv" kind (Sigma DiffQKV, PAPERS.md §1 "Sigma DiffQKV"): faithful tests.

* equal K and V configurations and no Q augmentation == the "mha" (GQA) kind, bitwise;
* separate key and value head counts and dims broadcast correctly: query head n reads key head
  n // (N / K_k) and value head n // (N / K_v) (a plain numpy reference);
* the augmented Q is projected back correctly (identity activation, W_qb = [I; 0] == the
  un-augmented layer);
* K- and V-cache bytes per token == (K_k·H + K_v·V)·itemsize;
* DecoderLM (``diffqkv-tiny``): prefill + N decode steps == the full forward;
* the Pallas TPU flash kernel (interpret mode) serves different key and value head dims
  (== "xla"; its gradients at H != V are the kernel tests'); different head counts: a named
  kernel refuses naming k_BSKH / v_BSKV, "auto" falls back to a pure-XLA path, logged;
* bad input names the field and the layer.
"""

import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.layers import AttentionConfig, DiffQKVConfig
from models import DecoderLM, LayerSpec, get_config

D = 32


def _x(b=2, t=6, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def test_equal_k_and_v_without_augmentation_is_gqa_bitwise():
    kw = dict(d_model=D, num_heads=8, num_kv_heads=2, implementation="xla")
    diff = DiffQKVConfig(**kw).build(rngs=nnx.Rngs(0))
    mha = AttentionConfig(**kw).build(rngs=nnx.Rngs(0))
    x = _x()
    np.testing.assert_array_equal(diff(x), mha(x))


def test_separate_key_and_value_heads_and_dims_against_reference():
    c = DiffQKVConfig(
        d_model=D, num_heads=6, num_kv_heads=2, num_v_heads=3, head_dim=4, v_head_dim=10,
        implementation="xla",
    )  # fmt: skip
    layer = c.build(rngs=nnx.Rngs(1))
    x = _x(seed=1)
    q, k, v = (np.asarray(getattr(layer, n)(x), np.float64) for n in "qkv")
    assert k.shape[2:] == (2, 4) and v.shape[2:] == (3, 10)
    b, t, n, h = q.shape
    o = np.zeros((b, t, n, 10))
    causal = np.tril(np.ones((t, t), bool))
    for ni in range(n):
        s = np.einsum("bth,bsh->bts", q[:, :, ni], k[:, :, ni // 3]) / np.sqrt(h)
        p = np.exp(np.where(causal, s, -np.inf) - s.max(-1, keepdims=True))
        o[:, :, ni] = np.einsum("bts,bsv->btv", p / p.sum(-1, keepdims=True), v[:, :, ni // 2])
    want = np.einsum("btnv,nvd->btd", o, np.asarray(layer.o.kernel[...], np.float64))
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-6)
    cache = layer.init_cache(2, 16, jnp.bfloat16)
    assert cache.bytes_per_token() == (2 * 4 + 3 * 10) * 2 == c.cache_numbers_per_token * 2


def test_augmented_q_is_projected_back_exactly():
    kw = dict(d_model=D, num_heads=4, num_kv_heads=2, implementation="xla")
    aug = DiffQKVConfig(**kw, augmented_q_dim=16).build(rngs=nnx.Rngs(0))
    plain = AttentionConfig(**kw).build(rngs=nnx.Rngs(0))
    assert aug.q.kernel.shape == (D, 4, 16) and aug.q_back.kernel.shape == (16, 8)
    wq = np.array(aug.q.kernel[...])
    wq[:, :, :8] = np.asarray(plain.q.kernel[...])  # the other 8 columns stay random
    aug.q.kernel.set_value(jnp.asarray(wq))
    aug.q_back.kernel.set_value(jnp.eye(16, 8))  # [I; 0]
    for name in "kvo":
        getattr(aug, name).kernel.set_value(getattr(plain, name).kernel[...])
    x = _x(seed=2)
    np.testing.assert_allclose(aug(x), plain(x), rtol=1e-6, atol=1e-7)


def test_decoder_prefill_and_steps_equal_forward():
    config = get_config("diffqkv-tiny", implementation="xla", num_layers=1)
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(decode_all(model, tokens), full, atol=2e-5, rtol=2e-5)
    per_layer = [c.bytes_per_token() for c in model.init_cache(1, 8, jnp.float32)]
    assert per_layer == [(2 * 8 + 4 * 16) * 4]  # GQA with K = 2, H = 8: 2·2·8·4


def test_bad_input_names_field_and_layer():
    with pytest.raises(ValueError, match=r"layer 0 \('diffqkv'\): num_v_heads=3 must divide"):
        get_config("diffqkv-tiny", layer_pattern=(LayerSpec.of("diffqkv", num_v_heads=3),))
    with pytest.raises(ValueError, match=r"augmented_q_dim=8 must be an int > head_dim=8"):
        DiffQKVConfig(d_model=D, num_heads=4, augmented_q_dim=8)
    with pytest.raises(ValueError, match="augmented_q_activation='relu' must be one of"):
        DiffQKVConfig(d_model=D, num_heads=4, augmented_q_dim=16, augmented_q_activation="relu")


def _layer_out(impl, x, **kw):
    c = DiffQKVConfig(d_model=D, num_heads=4, num_kv_heads=2, implementation=impl, **kw)
    return c.build(rngs=nnx.Rngs(0))(x)


def test_pallas_serves_different_dims_and_refuses_different_counts(monkeypatch, caplog):
    from jax.experimental.pallas import tpu as pltpu

    from jaxattn import dot_product_attention

    x = _x(b=1, t=16, seed=6)
    dims = dict(head_dim=16, v_head_dim=32)  # K_k = K_v = 2, V = 2·H
    counts = dict(dims, num_v_heads=4)
    layer = DiffQKVConfig(d_model=D, num_heads=4, num_kv_heads=2, **dims).build(rngs=nnx.Rngs(0))
    q, k, v = (getattr(layer, n)(x) for n in "qkv")  # the op's operands in this layer
    assert q.shape[-1] == k.shape[-1] == 16 and v.shape[-1] == 32
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        got = dot_product_attention(q, k, v, mask=layer.config.mask, implementation="pallas_tpu")
        v4 = jnp.concatenate([v, -v], 2)  # K_v = 4 value heads over K_k = 2 key heads
        with pytest.raises(NotImplementedError, match=r"k_BSKH has K=2 heads, v_BSKV K_v=4"):
            dot_product_attention(q, k, v4, implementation="pallas_tpu")
    want = dot_product_attention(q, k, v, mask=layer.config.mask, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # what "auto" sees on a TPU
    monkeypatch.setattr(importlib.import_module("jaxattn.ops.attention"), "_logged", set())
    with caplog.at_level(logging.WARNING, logger="jaxattn"):
        got = _layer_out("auto", x, **counts)
    assert "pallas_tpu cannot serve a call (separate key and value head counts" in caplog.text
    monkeypatch.undo()
    np.testing.assert_allclose(got, _layer_out("xla", x, **counts), rtol=2e-5, atol=2e-6)
