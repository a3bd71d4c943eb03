"""Efficient Probing (jaxattn.layers.EfficientProbe, jaxattn.ops.efficient_probing).

* parameter counts: EP's actual parameters == M·D + D·E (+ E) + E·C + C; a real MHA probe
  built here from Linear layers has D + 4(D² + D) + D·C + C; EP has fewer;
* EP pooling == jax.nn.dot_product_attention of the M queries over the tokens, query m
  keeping its own value-channel group; with M = 1 and W_v = I it equals the MHA probe with
  identity projections (PAPERS.md's reduction); logits = the classifier of the pooling;
* the frozen tokens: no gradient reaches their producer (and does without stop_gradient);
* padding is ignored, a fully padded row pools to zeros; bad input names the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import EfficientProbeConfig, Linear
from jaxattn.layers._efficient_probe import ep_probe_num_params, mha_probe_num_params
from jaxattn.ops.efficient_probing import efficient_probing_pool

TOL = dict(atol=1e-5, rtol=1e-5)
_pool = nnx.jit(lambda m, x, mask=None: m.pool(x, mask) if mask is not None else m.pool(x))


def _count(module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


class MHAProbe(nnx.Module):
    """The conventional attentive probe: one learned query, W_q/W_k/W_v/W_o with biases."""

    def __init__(self, d, c, heads, rngs):
        h = d // heads
        self.query = nnx.Param(jax.random.normal(rngs.params(), (d,)) * 0.02)
        self.q, self.k, self.v = (
            Linear((d,), (heads, h), axes=("embed", "heads", "head_dim"), use_bias=True, rngs=rngs)
            for _ in range(3)
        )
        self.o = Linear((heads, h), (d,), axes=("heads", "head_dim", "embed"), use_bias=True,
                        rngs=rngs)  # fmt: skip
        self.head = Linear((d,), (c,), axes=("embed", "vocab"), use_bias=True, rngs=rngs)

    def pool(self, x_BSD):
        b = x_BSD.shape[0]
        q = self.q(jnp.broadcast_to(self.query[...], (b, 1, x_BSD.shape[-1])))
        o = jax.nn.dot_product_attention(q, self.k(x_BSD), self.v(x_BSD))  # [B, 1, heads, h]
        return self.o(o)[:, 0]


def _x(b, s, d, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, s, d)), jnp.float32)


@pytest.mark.parametrize(
    "d,c,m,d_out,v_bias", [(64, 10, 32, 1, False), (64, 10, 8, 2, True), (128, 100, 4, 4, False)]
)
def test_parameter_counts_match_the_formulas_and_undercut_mha(d, c, m, d_out, v_bias):
    cfg = EfficientProbeConfig(d_model=d, num_classes=c, num_queries=m, d_out=d_out, v_bias=v_bias)
    # abstract modules (nnx.eval_shape): counting parameters needs shapes, not values, and
    # eager initialisation compiled one program per parameter shape
    ep = nnx.eval_shape(lambda: cfg.build(rngs=nnx.Rngs(0)))
    e = d // d_out
    assert _count(ep) == cfg.num_params == m * d + d * e + (e if v_bias else 0) + e * c + c
    mha = nnx.eval_shape(lambda: MHAProbe(d, c, heads=4, rngs=nnx.Rngs(0)))
    assert _count(mha) == mha_probe_num_params(d, c) == d + 4 * (d * d + d) + d * c + c
    assert _count(ep) < _count(mha)
    assert ep_probe_num_params(d, c, m, d_out, v_bias) == cfg.num_params


def _dpa_reference(queries_MD, x_BSD, v_BSE):
    """Every query over all value channels with jax.nn.dot_product_attention, then query m
    keeps its own channel group."""
    (m, d), (b, _, e) = queries_MD.shape, v_BSE.shape
    # jax's op wants value width == key width: pad E to D with zeros, keep the first E
    v_pad = jnp.pad(v_BSE, ((0, 0), (0, 0), (0, d - e)))
    full = jax.nn.dot_product_attention(  # [B, M, 1, D]
        jnp.broadcast_to(queries_MD[None, :, None, :], (b, m, 1, d)), x_BSD[:, :, None, :],
        v_pad[:, :, None, :],
    )[:, :, 0, :e]  # fmt: skip
    g = e // m
    return jnp.concatenate([full[:, i, i * g : (i + 1) * g] for i in range(m)], axis=-1)


def test_pooling_equals_dot_product_attention_reference():
    b, s, d, m, d_out, c = 3, 17, 32, 4, 2, 5
    cfg = EfficientProbeConfig(d_model=d, num_classes=c, num_queries=m, d_out=d_out, v_bias=True)
    ep = cfg.build(rngs=nnx.Rngs(1))
    x = _x(b, s, d)
    queries = jnp.asarray(np.random.default_rng(2).normal(size=(m, d)), jnp.float32)
    ep.queries[...] = queries  # non-tiny queries, so the softmax is far from uniform
    v = ep.v(x)  # [B, S, E]
    ref = _dpa_reference(queries, x, v)
    np.testing.assert_allclose(_pool(ep, x), ref, **TOL)
    logits = nnx.jit(lambda m, x: m(x))(ep, x)
    np.testing.assert_allclose(logits, ep.head(ref), **TOL)
    assert logits.shape == (b, c)
    # the op's gradients (queries, tokens, values) == the reference's
    ct = _x(b, 1, d // d_out, seed=3)[:, 0]
    grads = [
        jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * ct), argnums=(0, 1, 2)))(queries, x, v)
        for f in (efficient_probing_pool, _dpa_reference)
    ]
    for a, r in zip(*grads):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-4)


def test_single_query_identity_value_equals_mha_probe_with_identity_projections():
    b, s, d, c = 2, 9, 16, 3
    ep = EfficientProbeConfig(d_model=d, num_classes=c, num_queries=1).build(rngs=nnx.Rngs(3))
    mha = MHAProbe(d, c, heads=1, rngs=nnx.Rngs(4))
    query = jnp.asarray(np.random.default_rng(5).normal(size=(d,)), jnp.float32)
    ep.queries[...], mha.query[...] = query[None], query
    ep.v.kernel[...] = jnp.eye(d)
    for lin in (mha.q, mha.k, mha.v):
        lin.kernel[...], lin.bias[...] = jnp.eye(d).reshape(d, 1, d), jnp.zeros((1, d))
    mha.o.kernel[...], mha.o.bias[...] = jnp.eye(d).reshape(1, d, d), jnp.zeros(d)
    x = _x(b, s, d, seed=6)
    np.testing.assert_allclose(_pool(ep, x), _pool(mha, x), **TOL)


@pytest.mark.parametrize("stop", [True, False])
def test_no_gradient_reaches_the_frozen_features_producer(stop):
    d = 16
    backbone = Linear((8,), (d,), axes=("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(7))
    ep = EfficientProbeConfig(d_model=d, num_classes=4, num_queries=4, stop_gradient=stop).build(
        rngs=nnx.Rngs(8)
    )
    inp = _x(2, 6, 8, seed=9)

    def loss(backbone, ep):
        return jnp.sum(jnp.sin(ep(backbone(inp))))

    g_backbone, g_ep = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(backbone, ep)
    bb = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(nnx.state(g_backbone)))
    probe = [float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(nnx.state(g_ep))]
    assert min(probe) > 0  # every probe parameter trains
    assert (bb == 0.0) if stop else (bb > 0)


def test_padding_is_ignored_and_a_fully_padded_row_pools_to_zeros():
    d = 16
    ep = EfficientProbeConfig(d_model=d, num_classes=3, num_queries=2).build(rngs=nnx.Rngs(10))
    x = _x(2, 8, d, seed=11)
    mask = jnp.asarray([[True] * 5 + [False] * 3, [False] * 8])
    pooled = _pool(ep, x, mask)
    np.testing.assert_allclose(pooled[0], _pool(ep, x[:1, :5])[0], **TOL)
    np.testing.assert_array_equal(pooled[1], jnp.zeros_like(pooled[1]))
    grad = nnx.jit(lambda m, x: jax.grad(lambda x: jnp.sum(m.pool(x, mask)))(x))(ep, x)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_bad_config_and_input_name_the_field():
    with pytest.raises(ValueError, match="num_queries"):
        EfficientProbeConfig(d_model=64, num_classes=10, num_queries=5)
    with pytest.raises(ValueError, match="d_out"):
        EfficientProbeConfig(d_model=64, num_classes=10, d_out=3)
    with pytest.raises(ValueError, match="num_classes"):
        EfficientProbeConfig(d_model=64, num_classes=0)
    ep = EfficientProbeConfig(d_model=16, num_classes=3, num_queries=2).build(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x_BSD"):
        ep(jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match="mask_BS"):
        ep(jnp.ones((2, 5, 16)), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="multiple of M"):
        efficient_probing_pool(jnp.ones((3, 4)), jnp.ones((1, 2, 4)), jnp.ones((1, 2, 4)))
