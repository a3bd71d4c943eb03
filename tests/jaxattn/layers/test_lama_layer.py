"""Low-rank factorised compact MHSA (LAMA, PAPERS.md §1 "Low-rank factorized compact MHSA").

``lama_pool`` (the paper's form, one global context query):
* each head's attention sums to 1 over the tokens and is 0 on padding (padded states change
  nothing); the parameter count follows the rank formula, below MHSA's;
* at full rank R = m·d it equals the unfactorised per-head bilinear reference h^T W_j c;
* its cost is linear in the sequence length (compiled FLOPs at 2S / at S);
the ``"lowrank_mhsa"`` kind (causal-LM adaptation): scores f_j(x_s, c_t) against a numpy
reference, packed sequences do not mix, prefill + N steps == full forward, bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.layers import LowRankMHSAConfig, lama_pool
from jaxattn.layers._context import Context
from models import DecoderLM, LayerSpec, get_config

rng = np.random.default_rng(0)


def test_pool_rows_sum_to_one_and_respect_padding():
    b, s, d, r, m = 2, 9, 6, 3, 4
    h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    u, w = (jnp.asarray(rng.normal(size=(d, r)), jnp.float32) for _ in range(2))
    p = jnp.asarray(rng.normal(size=(r, m)), jnp.float32)
    mask = jnp.asarray(np.arange(s)[None] < np.array([[9], [5]]))
    out, a = lama_pool(h, u, w, p, mask)
    np.testing.assert_allclose(a.sum(-1), np.ones((b, m)), rtol=1e-6)
    assert np.all(np.asarray(a)[1, :, 5:] == 0)
    out2, _ = lama_pool(h.at[1, 5:].set(100.0), u, w, p, mask)  # padded states are ignored
    np.testing.assert_allclose(out2, out, rtol=1e-6)
    c = LowRankMHSAConfig(d_model=64, num_heads=4, rank=16)
    assert c.num_affinity_params == 2 * 64 * 16 + 16 * 4 < 2 * 64 * 64


def test_pool_at_full_rank_equals_unfactorised_bilinear_heads():
    b, s, d, m = 2, 7, 5, 3
    h = rng.normal(size=(b, s, d))
    w_heads = rng.normal(size=(m, d, d))  # one unconstrained bilinear form per head
    u = np.tile(np.eye(d), (1, m))  # [d, m·d]: U = [I … I]
    v = np.concatenate([w_heads[j].T for j in range(m)], 1)  # V = [W_1ᵀ … W_mᵀ]
    p = np.kron(np.eye(m), np.ones((d, 1)))  # [m·d, m] block indicator
    out, a = lama_pool(*(jnp.asarray(x, jnp.float32) for x in (h, u, v, p)))
    c = h.mean(1)
    f = np.einsum("bsd,jde,be->bjs", h, w_heads, c)
    want_a = np.exp(f - f.max(-1, keepdims=True))
    want_a /= want_a.sum(-1, keepdims=True)
    np.testing.assert_allclose(a, want_a, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out, np.einsum("bjs,bsd->bjd", want_a, h), rtol=2e-4, atol=1e-5)


def test_pool_cost_is_linear_in_length():
    d, r, m = 16, 4, 4
    args = lambda s: (jnp.zeros((1, s, d)), jnp.zeros((d, r)), jnp.zeros((d, r)), jnp.zeros((r, m)))
    flops = [
        jax.jit(lama_pool).lower(*args(s)).compile().cost_analysis()["flops"] for s in (512, 1024)
    ]
    assert 1.8 < flops[1] / flops[0] < 2.2, flops


def test_layer_scores_are_the_context_bilinear_form():
    c = LowRankMHSAConfig(d_model=16, num_heads=4, rank=6, implementation="xla")
    layer = c.build(rngs=nnx.Rngs(1))
    x = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1]] * 2)
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3]] * 2)

    @nnx.jit
    def outputs(layer, x):  # the three forwards in one compiled program
        packed = layer(x, Context.create(2, 7, positions_BT=pos, segment_ids_BT=seg))
        return layer(x), packed, layer(x[:, 3:])

    out, packed, second = outputs(layer, x)
    f64 = lambda a: np.asarray(a, np.float64)
    xs = f64(x)
    u, w = f64(layer.key.kernel[...])[:, 0], f64(layer.context.kernel[...])
    p, wv = f64(layer.head_mix[...]), f64(layer.v.kernel[...])[:, 0]
    t = x.shape[1]
    ctx_vec = np.cumsum(xs, 1) / np.arange(1, t + 1)[None, :, None]  # c_t: causal mean
    f = np.einsum("bsr,rj,btr->bjts", xs @ u, p, ctx_vec @ w) / np.sqrt(6)  # f_j(x_s, c_t)
    f = np.where(np.tril(np.ones((t, t), bool)), f, -np.inf)
    a = np.exp(f - f.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bjts,bsv->btjv", a, xs @ wv)
    want = np.einsum("btjv,jvd->btd", o, f64(layer.o.kernel[...]))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:], second, rtol=1e-5, atol=1e-6)


def test_decoder_prefill_and_steps_equal_forward():
    config = get_config("lowrank-mhsa-tiny", implementation="xla", num_layers=1)
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, 256, (2, 9)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(decode_all(model, tokens), full, atol=2e-5, rtol=2e-5)
    assert model.init_cache(1, 4, jnp.bfloat16)[0].bytes_per_token() == (16 + 16) * 2


def test_bad_input_names_field_and_layer():
    with pytest.raises(ValueError, match=r"layer 0 \('lowrank_mhsa'\).*rank=0 must be >= 1"):
        get_config("lowrank-mhsa-tiny", layer_pattern=(LayerSpec.of("lowrank_mhsa", rank=0),))
    with pytest.raises(ValueError, match="num_heads=3 must divide d_model=16"):
        LowRankMHSAConfig(d_model=16, num_heads=3)
