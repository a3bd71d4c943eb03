"""The "ssa" kind (Selective Self-Attention, PAPERS.md §1 "SSA"): faithful tests.

* temperature 1 and no value scaling (u = w = 0 and β = 10, where exp(-exp(β)) underflows to
  0) == the "mha" kind with the same parameters, bitwise; a fresh layer (β = 1.5, the authors'
  init) is not: its position term exp(-exp(1.5))·log(t + 1) sharpens rows t >= 1;
* with temperatures on, the layer == a plain-jnp reference of the module docstring's
  equations (logits τ_q · q·k · scale, values τ_v · v);
* row entropy falls as the position temperature grows and rises when the token temperature
  drops below 1 (softmax(c·z) entropy is decreasing in c > 0);
* extra parameters: H + 1 + V per layer, < 0.5% of the model (paper: "fewer than 0.5%");
* DecoderLM (``ssa-tiny``): prefill + N decode steps == the full forward; HF export refuses;
* bad input names the field and the layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.layers import AttentionConfig, SSAConfig
from jaxattn.layers._context import Context
from models import DecoderLM, LayerSpec, get_config, to_hf

D, N, K, T = 32, 4, 2, 7


def _x(b=2, t=T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def _ssa(**kw):
    c = SSAConfig(d_model=D, num_heads=N, num_kv_heads=K, implementation="xla", **kw)
    return c.build(rngs=nnx.Rngs(0))


def _set(layer, seed=1, u=0.5, beta=-1.0, w=0.5):
    """Random u and w (scaled), β set (β = -1: coefficient exp(-e^-1) ≈ 0.69)."""
    rng = np.random.default_rng(seed)
    layer.tau_u.set_value(jnp.asarray(u * rng.normal(size=layer.tau_u.shape), jnp.float32))
    layer.tau_beta.set_value(jnp.asarray(beta, jnp.float32))
    layer.tau_w.set_value(jnp.asarray(w * rng.normal(size=layer.tau_w.shape), jnp.float32))


def test_temperature_one_equals_mha_exactly():
    ssa = _ssa(position_beta_init=10.0)  # exp(-exp(10)) == 0 in fp32: no position term
    mha = AttentionConfig(d_model=D, num_heads=N, num_kv_heads=K, implementation="xla").build(
        rngs=nnx.Rngs(0)
    )
    x = _x()
    tau, tau_v = ssa.temperatures(ssa.q(x, None), ssa.v(x, None), Context.create(2, T))
    np.testing.assert_array_equal(tau, np.ones((2, T, N)))
    np.testing.assert_array_equal(tau_v, np.ones((2, T, K)))
    np.testing.assert_array_equal(ssa(x), mha(x))


def test_fresh_layer_has_the_authors_position_term():
    """β = 1.5 at birth (the authors' ``gpt_2_PTS.py``): τ_q = 1 + exp(-exp(1.5))·log(t + 1),
    the same for every head and token, so row 0 is MHA's and later rows differ."""
    ssa = _ssa()
    assert float(ssa.tau_beta[...]) == 1.5 and ssa.tau_beta[...].shape == ()
    x = _x()
    tau, _ = ssa.temperatures(ssa.q(x, None), ssa.v(x, None), Context.create(2, T))
    want = 1 + np.exp(-np.exp(1.5)) * np.log(np.arange(1, T + 1))
    np.testing.assert_allclose(tau, np.broadcast_to(want[None, :, None], (2, T, N)), rtol=1e-6)
    mha, x = _mha_of(ssa.config), 10 * x  # larger logits: the small coefficient shows
    got, ref = np.asarray(ssa(x)), np.asarray(mha(x))
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=1e-6, atol=1e-7)
    assert np.abs(got[:, 1:] - ref[:, 1:]).max() > 1e-5


def _reference(layer, x_BTD):
    """The module docstring's equations in plain jnp (causal, no RoPE / qk-norm)."""
    q = jnp.einsum("btd,dnh->btnh", x_BTD, layer.q.kernel[...])
    k = jnp.einsum("btd,dkh->btkh", x_BTD, layer.k.kernel[...])
    v = jnp.einsum("btd,dkv->btkv", x_BTD, layer.v.kernel[...])
    pos = jnp.arange(x_BTD.shape[1], dtype=jnp.float32)
    tau = jnp.tanh(q @ layer.tau_u[...]) + 1
    tau += jnp.exp(-jnp.exp(layer.tau_beta[...])) * jnp.log(pos + 1)[None, :, None]
    v = v * (1 + jnp.tanh(v @ layer.tau_w[...]))[..., None]
    k, v = (jnp.repeat(a, N // K, axis=2) for a in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * tau.transpose(0, 2, 1)[..., None] / 8**0.5
    t = x_BTD.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    p = jax.nn.softmax(logits, -1)
    o = jnp.einsum("bnts,bsnv->btnv", p, v)
    return jnp.einsum("btnv,nvd->btd", o, layer.o.kernel[...]), p


def test_layer_equals_reference_equations():
    ssa = _ssa()
    _set(ssa)
    x = _x(seed=2)
    np.testing.assert_allclose(ssa(x), _reference(ssa, x)[0], atol=2e-5, rtol=2e-5)


def _row_entropy(layer, x):
    p = _reference(layer, x)[1]
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), -1)  # [B, N, T]


def test_row_entropy_moves_with_the_temperature():
    ssa, x = _ssa(position_beta_init=10.0), _x(seed=3)
    base = _row_entropy(ssa, x)
    prev = base
    for beta in (0.0, -2.0):  # smaller β, larger position temperature: sharper rows t >= 1
        _set(ssa, u=0.0, beta=beta, w=0.0)
        ent = _row_entropy(ssa, x)
        assert np.all(np.asarray(ent[..., 1:] < prev[..., 1:])), beta
        np.testing.assert_allclose(ent[..., 0], 0.0, atol=1e-6)  # one key: entropy 0
        prev = ent
    # the token temperature: rows with τ < 1 flatter than standard, τ > 1 sharper
    ssa.tau_beta.set_value(jnp.asarray(10.0))
    ssa.tau_u.set_value(jnp.full((ssa.config.h,), 2.0))
    q = jnp.einsum("btd,dnh->btnh", x, ssa.q.kernel[...])
    tau = np.asarray(ssa.temperatures(q, None, Context.create(2, T))[0]).transpose(0, 2, 1)
    ent, lo, hi = _row_entropy(ssa, x)[..., 1:], tau[..., 1:] < 0.95, tau[..., 1:] > 1.05
    assert lo.sum() >= 5 and hi.sum() >= 5, (lo.sum(), hi.sum())
    assert np.all(np.asarray(ent > base[..., 1:])[lo])
    assert np.all(np.asarray(ent < base[..., 1:])[hi])


def test_extra_parameters_below_half_a_percent():
    config = get_config("ssa-tiny")
    c = config.layer_attention_config(0)
    n_params = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    ssa_layer, mha_layer = c.build(rngs=nnx.Rngs(0)), _mha_of(c)
    assert n_params(ssa_layer) - n_params(mha_layer) == c.num_extra_params == c.h + 1 + c.v
    total = n_params(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    base = n_params(nnx.eval_shape(lambda: DecoderLM(get_config("llama-tiny"), rngs=nnx.Rngs(0))))
    assert total - base == config.num_layers * c.num_extra_params
    assert (total - base) / base < 0.005


def _mha_of(c):
    fields = {f: getattr(c, f) for f in AttentionConfig.__dataclass_fields__ if f != "kind"}
    return AttentionConfig(**fields).build(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    m = DecoderLM(get_config("ssa-tiny", implementation="xla"), rngs=nnx.Rngs(0))
    for i, block in enumerate(m.layers):
        _set(block.attn, seed=10 + i)
    return m


def test_decoder_prefill_and_steps_equal_forward(model):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)

    np.testing.assert_allclose(decode_all(model, tokens), full, atol=2e-5, rtol=2e-5)


def test_hf_export_refuses(model, tmp_path):
    with pytest.raises(ValueError, match="'ssa'.*no Hugging Face equivalent"):
        to_hf(model, str(tmp_path))


def test_bad_input_names_field_and_layer():
    with pytest.raises(ValueError, match=r"layer 1 \('ssa'\).*value_temperature='yes' must"):
        get_config(
            "ssa-tiny",
            layer_specs=(LayerSpec(), LayerSpec.of("ssa", value_temperature="yes")),
        )
    with pytest.raises(ValueError, match=r"layer 1 \('ssa'\).*position_beta_init=inf must"):
        inf = LayerSpec.of("ssa", position_beta_init=float("inf"))
        get_config("ssa-tiny", layer_specs=(LayerSpec(), inf))
    with pytest.raises(ValueError, match="position_beta_init='1.5' must be a number"):
        SSAConfig(d_model=D, num_heads=N, position_beta_init="1.5")
