"""The "kdgqa" / "dgqa" kinds (key-driven GQA, PAPERS.md §1 "KDGQA / DGQA / PGQA"): faithful tests.

* the allocation: group sizes sum to N, each query head reads exactly one kv head, it is a
  deterministic function of the norm ratios (rounding + argmax / argmin fix-up);
* equal key norms reduce to uniform GQA: bitwise the "mha" kind's output;
* unequal norms: each query head attends over its own group's kv head (an independent
  per-token reference);
* DGQA's statistic changes only in training (ctx.rng set, not a cache step);
* conversion from MHA mean-pools each group's k / v heads;
* DecoderLM (a "kdgqa" and a "dgqa" layer): prefill + N decode steps == the full forward;
* bad input names the field and the layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.convert import layer_params, load_layer_params, mean_pool_kv_heads
from jaxattn.layers import AttentionConfig, DGQAConfig, KDGQAConfig
from jaxattn.layers._context import Context
from jaxattn.layers._kdgqa import allocate_query_heads, query_head_groups
from models import DecoderLM, LayerSpec, get_config

D = 32


def _x(b=2, t=6, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def test_allocation_sums_to_n_and_follows_the_ratios():
    a = allocate_query_heads(jnp.asarray([[3.0, 1.0], [1.0, 1.0], [10.0, 0.1]]), 8)
    np.testing.assert_array_equal(a, [[6, 2], [4, 4], [8, 0]])
    # round(8/3) = 3 each sums to 9: the largest (first) loses one
    np.testing.assert_array_equal(allocate_query_heads(jnp.ones((3,)), 8), [2, 3, 3])
    # round(1.25) = 1 each sums to 4 < 5: the smallest (first) gains one
    np.testing.assert_array_equal(allocate_query_heads(jnp.ones((4,)), 5), [2, 1, 1, 1])
    np.testing.assert_array_equal(
        query_head_groups(jnp.asarray([2, 3, 3]), 8), [0, 0, 1, 1, 1, 2, 2, 2]
    )
    np.testing.assert_array_equal(query_head_groups(jnp.asarray([0, 3, 1]), 4), [1, 1, 1, 2])
    s = jnp.asarray(np.random.default_rng(0).uniform(0.1, 5, (50, 3)), jnp.float32)
    a = np.asarray(allocate_query_heads(s, 7))
    assert (a.sum(-1) == 7).all() and (a >= 0).all()
    np.testing.assert_array_equal(a, allocate_query_heads(s * 2.5, 7))  # ratios only


def _pair(cls=KDGQAConfig, **kw):
    common = dict(d_model=D, num_heads=8, num_kv_heads=2, implementation="xla", **kw)
    layer = cls(**common).build(rngs=nnx.Rngs(0))
    mha = AttentionConfig(**common).build(rngs=nnx.Rngs(0))  # same init stream, same params
    return layer, mha


def test_equal_key_norms_are_uniform_gqa_bitwise():
    from jaxattn.ops.rope import RopeConfig

    layer, mha = _pair(rope=RopeConfig(theta=10000.0))
    for m in (layer, mha):  # kv head 1 = -kv head 0: different keys, equal norms
        w = m.k.kernel[...]
        m.k.kernel.set_value(w.at[:, 1].set(-w[:, 0]))
    x = _x()
    idx = layer.groups(x, Context.create(2, 6))
    np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(8) // 4, (2, 6, 8)))
    np.testing.assert_array_equal(layer(x), mha(x))


def _reference(layer, x):
    """Per token t and query head n: causal softmax attention of q_n over kv head idx[t, n]."""
    c = layer.config
    q = np.asarray(layer.q(x), np.float64)
    k = np.asarray(layer.k(x), np.float64)
    v = np.asarray(layer.v(x), np.float64)
    norms = np.linalg.norm(k, axis=-1)
    b, t, n, h = q.shape
    o = np.zeros((b, t, n, c.v))
    for bi in range(b):
        for ti in range(t):
            a = np.round(norms[bi, ti] / norms[bi, ti].sum() * n).astype(int)
            while a.sum() > n:
                a[np.argmax(a)] -= 1
            while a.sum() < n:
                a[np.argmin(a)] += 1
            groups = np.repeat(np.arange(len(a)), a)
            for ni in range(n):
                g = groups[ni]
                s = k[bi, : ti + 1, g] @ q[bi, ti, ni] / np.sqrt(h)
                p = np.exp(s - s.max())
                o[bi, ti, ni] = (p / p.sum()) @ v[bi, : ti + 1, g]
    return np.einsum("btnv,nvd->btd", o, np.asarray(layer.o.kernel[...], np.float64))


def test_unequal_norms_attend_over_their_own_group():
    layer, _ = _pair()
    w = layer.k.kernel[...]
    layer.k.kernel.set_value(w.at[:, 1].multiply(3.0))  # kv head 1: larger norms, most heads
    x = _x(seed=1)
    idx = np.asarray(layer.groups(x, Context.create(2, 6)))
    assert (np.bincount(idx.ravel(), minlength=2)[1] > idx.size // 2) and len(np.unique(idx)) == 2
    np.testing.assert_allclose(layer(x), _reference(layer, x), rtol=2e-5, atol=2e-6)


def test_dgqa_statistic_updates_in_training_only():
    layer, _ = _pair(DGQAConfig)
    x = _x()
    m0 = np.asarray(layer.key_norm_ema[...])
    np.testing.assert_array_equal(m0, [1.0, 1.0])
    layer(x)  # evaluation: no rng
    layer.decode(
        x[:, :2], layer.init_cache(2, 8, jnp.float32), Context.create(2, 2, rng=jax.random.key(0))
    )
    np.testing.assert_array_equal(layer.key_norm_ema[...], m0)
    out = layer(x, Context.create(2, 6, rng=jax.random.key(0)))  # training
    norms = np.linalg.norm(np.asarray(layer.k(x)), axis=-1).reshape(-1, 2).mean(0)
    np.testing.assert_allclose(layer.key_norm_ema[...], 0.9 * m0 + 0.1 * norms, rtol=1e-6)
    _, mha = _pair()
    np.testing.assert_array_equal(out, mha(x))  # that forward used m from before: uniform
    layer.key_norm_ema.set_value(jnp.asarray([1.0, 3.0]))  # groups [2, 6] at every token
    idx = layer.groups(x, Context.create(2, 6))
    np.testing.assert_array_equal(idx, np.broadcast_to([0, 0, 1, 1, 1, 1, 1, 1], (2, 6, 8)))


def test_conversion_from_mha_mean_pools_each_group():
    mha = AttentionConfig(d_model=D, num_heads=8, implementation="xla", qkv_bias=True)
    layer = mha.build(rngs=nnx.Rngs(3))
    params = layer_params(layer)
    config, new = mean_pool_kv_heads(mha, params, 2, kind="kdgqa")
    assert isinstance(config, KDGQAConfig) and config.n_kv == 2 and config.qkv_bias
    for name in ("k", "v"):
        w = params[name]["kernel"]
        np.testing.assert_allclose(new[name]["kernel"][:, 1], w[:, 4:].mean(1), rtol=1e-12)
        np.testing.assert_allclose(new[name]["bias"][0], params[name]["bias"][:4].mean(0))
    np.testing.assert_array_equal(new["q"]["kernel"], params["q"]["kernel"])
    converted = config.build(rngs=nnx.Rngs(0))
    load_layer_params(converted, new)
    assert converted(_x()).shape == (2, 6, D)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide N=8"):
        mean_pool_kv_heads(mha, params, 3)
    with pytest.raises(ValueError, match="an MHA layer"):
        mean_pool_kv_heads(config, new, 1)


def test_decoder_prefill_and_steps_equal_forward():
    # the two kinds mixed per layer (any kind mixes: tests/models/test_kinds.py)
    config = get_config(
        "kdgqa-tiny",
        implementation="xla",
        layer_pattern=(LayerSpec.of("kdgqa"), LayerSpec.of("dgqa")),
    )
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    # a non-uniform tracked statistic: groups [6, 2]
    model.layers[1].attn.key_norm_ema.set_value(jnp.asarray([3.0, 1.0]))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(decode_all(model, tokens), full, atol=2e-5, rtol=2e-5)


def test_bad_input_names_field_and_layer():
    with pytest.raises(ValueError, match=r"layer 0 \('kdgqa'\): num_kv_heads=3 must divide"):
        get_config("kdgqa-tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="num_v_heads=1 must equal num_kv_heads=2"):
        KDGQAConfig(d_model=D, num_heads=8, num_kv_heads=2, num_v_heads=1)
    with pytest.raises(ValueError, match=r"DGQAConfig.ema_decay=1.0 must be in \(0, 1\)"):
        DGQAConfig(d_model=D, num_heads=8, num_kv_heads=2, ema_decay=1.0)
    with pytest.raises(ValueError, match=r"layer 1 \('dgqa'\).*ema_decay=-0.5 must be > 0"):
        get_config("dgqa-tiny", layer_specs=(LayerSpec(), LayerSpec.of(ema_decay=-0.5)))
