"""The "cca" kind (CCA / CCGQA, PAPERS.md §2 "CCA / CCGQA"): faithful tests.

* compression factor 1 with the convolutions, qk-mean, value shift and L2 norm off == the
  "mha" kind with the same parameters, bitwise;
* every stage against an independent numpy reference (random convolutions, value shift,
  qk-mean, L2 qk-norm with temperature; CCGQA with 2 kv heads);
* KV-cache bytes and the op's head width (so its score FLOPs) scale by 1 / compression
  (1 / (C·G) with head sharing);
* packed sequences: no convolution or value shift crosses a segment boundary;
* DecoderLM (``ccgqa-tiny``, random convolutions, RoPE): prefill + N steps == full forward;
* bad input names the field and the layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.layers import AttentionConfig, CCAConfig
from jaxattn.layers._context import Context
from models import DecoderLM, LayerSpec, get_config

D = 32
OFF = dict(convs=False, qk_mean=False, value_shift=False, qk_l2_norm=False)


def _x(b=2, t=7, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def _randomise_convs(layer, seed):
    rng = np.random.default_rng(seed)
    for name in ("q_conv1", "q_conv2", "k_conv1", "k_conv2"):
        p = getattr(layer, name)
        p.set_value(jnp.asarray(rng.normal(size=p.shape) * 0.5, jnp.float32))


def test_factor_one_without_extras_is_mha_bitwise():
    kw = dict(d_model=D, num_heads=4, implementation="xla")
    cca = CCAConfig(compression=1, **OFF, **kw).build(rngs=nnx.Rngs(0))
    mha = AttentionConfig(**kw).build(rngs=nnx.Rngs(0))
    x = _x()
    np.testing.assert_array_equal(cca(x), mha(x))


def _reference(layer, x):
    """CCA written out in numpy float64 (module docstring), no RoPE."""
    c = layer.config
    n, k, h, kk = c.n_q, c.n_kv, c.h, c.conv_kernel
    f = lambda a: np.asarray(a, np.float64)
    xq, xk, xv = (f(getattr(layer, m)(x)) for m in "qkv")
    b, t = x.shape[:2]
    qf, kf, vf = xq.reshape(b, t, -1), xk.reshape(b, t, -1), xv.reshape(b, t, -1)
    half = k * h // 2
    vf = np.concatenate([vf[:, :, :half], np.pad(vf[:, :-1, half:], ((0, 0), (1, 0), (0, 0)))], -1)

    def conv1(a, w):  # depthwise, causal
        return sum(np.pad(a, ((0, 0), (j, 0), (0, 0)))[:, :t] * w[j] for j in range(kk))

    def conv2(a, w, heads):  # within-head mixing, causal
        a = a.reshape(b, t, heads, h)
        out = sum(
            np.einsum("btni,nio->btno", np.pad(a, ((0, 0), (j, 0), (0, 0), (0, 0)))[:, :t], w[j])
            for j in range(kk)
        )
        return out.reshape(b, t, heads * h)

    q = conv2(conv1(qf, f(layer.q_conv1[...])), f(layer.q_conv2[...]), n).reshape(b, t, n, h)
    kc = conv2(conv1(kf, f(layer.k_conv1[...])), f(layer.k_conv2[...]), k).reshape(b, t, k, h)
    g = n // k
    q = q + 0.5 * np.repeat(xk, g, axis=2)
    kc = kc + 0.5 * xq.reshape(b, t, k, g, h).mean(3)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    kc = kc / np.linalg.norm(kc, axis=-1, keepdims=True) * float(layer.key_temperature[...])
    v = vf.reshape(b, t, k, h)
    o = np.zeros((b, t, n, h))
    causal = np.tril(np.ones((t, t), bool))
    for ni in range(n):
        s = np.einsum("bth,bsh->bts", q[:, :, ni], kc[:, :, ni // g]) / np.sqrt(h)
        p = np.exp(np.where(causal, s, -np.inf) - s.max(-1, keepdims=True))
        o[:, :, ni] = np.einsum("bts,bsh->bth", p / p.sum(-1, keepdims=True), v[:, :, ni // g])
    return np.einsum("btnh,nhd->btd", o, f(layer.o.kernel[...]))


def test_every_stage_against_reference():
    c = CCAConfig(d_model=D, num_heads=4, num_kv_heads=2, compression=2, implementation="xla")
    layer = c.build(rngs=nnx.Rngs(1))
    _randomise_convs(layer, 2)
    layer.key_temperature.set_value(jnp.asarray(1.7))
    x = _x(seed=1)
    out = nnx.jit(lambda m, x: m(x))(layer, x)  # compiled once: cheaper than op by op
    np.testing.assert_allclose(out, _reference(layer, x), rtol=1e-4, atol=1e-5)


def test_cache_bytes_and_score_width_scale_by_the_compression():
    mha = AttentionConfig(d_model=D, num_heads=4).build(rngs=nnx.Rngs(0))
    base = mha.init_cache(1, 8, jnp.bfloat16).bytes_per_token()
    x = _x(1, 5)
    for comp, kv, ratio in ((4, 4, 4), (2, 2, 4), (4, 2, 8)):
        cca = CCAConfig(d_model=D, num_heads=4, num_kv_heads=kv, compression=comp).build(
            rngs=nnx.Rngs(0)
        )
        assert base == cca.init_cache(1, 8, jnp.bfloat16).bytes_per_token() * ratio
        ctx = Context.create(1, 5)
        q, k, v = jax.eval_shape(lambda x, a=cca: a.attention_inputs(*a.project(x, ctx), ctx), x)
        assert q.shape[-1] * comp == D // 4 and q.shape[2] == 4  # score FLOPs 2·N·T·S·h: 1/C


def test_packed_sequences_do_not_mix():
    c = CCAConfig(d_model=D, num_heads=4, compression=2, implementation="xla")
    layer = c.build(rngs=nnx.Rngs(3))
    _randomise_convs(layer, 4)
    x = _x(1, 8, seed=5)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]])
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 4]])

    @nnx.jit
    def outputs(layer, x):  # the three forwards in one compiled program
        packed = layer(x, Context.create(1, 8, positions_BT=pos, segment_ids_BT=seg))
        return packed, layer(x[:, :3]), layer(x[:, 3:])

    packed, first, second = outputs(layer, x)
    np.testing.assert_allclose(packed[:, :3], first, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed[:, 3:], second, rtol=1e-5, atol=1e-6)


def test_decoder_prefill_and_steps_equal_forward():
    config = get_config(
        "ccgqa-tiny",
        implementation="xla",
        layer_pattern=(LayerSpec.of("cca", compression=2), LayerSpec.of("mha")),
    )  # mixed per layer with an "mha" layer
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    _randomise_convs(model.layers[0].attn, 6)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(decode_all(model, tokens), full, atol=3e-5, rtol=3e-5)


def test_bad_input_names_field_and_layer():
    with pytest.raises(ValueError, match=r"layer 0 \('cca'\): CCAConfig.compression=3 must divide"):
        get_config("ccgqa-tiny", layer_pattern=(LayerSpec.of("cca", compression=3),))
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide"):
        CCAConfig(d_model=D, num_heads=4, num_kv_heads=3, compression=2)
    with pytest.raises(ValueError, match="value_shift needs an even"):
        CCAConfig(d_model=8, num_heads=1, compression=8)
    with pytest.raises(ValueError, match=r"head_dim=16 != d_model / \(compression"):
        CCAConfig(d_model=D, num_heads=4, compression=2, head_dim=16)
    with pytest.raises(ValueError, match="CCAConfig.compression=0 must be >= 1"):
        CCAConfig(d_model=D, num_heads=4, compression=0)
