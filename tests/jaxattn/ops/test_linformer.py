"""Linformer (PAPERS.md §4): k = n with identity projections is softmax attention; O(n·k)
scores; the "linformer" kind (encoder only) and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import LinformerConfig, kind_config, registered_kinds
from jaxattn.ops.linformer import linformer_attention, linformer_project, linformer_scores


def _normal(seed, *shape):  # numpy-drawn: no eager jax.random compiles
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _qkv(b=2, t=16, n=4, k=2, h=8, s=None, seed=0):
    s = t if s is None else s
    r = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)  # noqa: E731
    return f(b, t, n, h), f(b, s, k, h), f(b, s, k, h)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared_e", "per_head_e"])
def test_identity_projection_k_eq_n_is_softmax_attention(per_head):
    q, k, v = _qkv()
    eye = jnp.eye(16)
    if per_head:
        eye = jnp.broadcast_to(eye, (2, 16, 16))
    got = linformer_attention(q, k, v, eye, eye, implementation="xla")
    want = jax.nn.dot_product_attention(q, k, v)  # the external oracle (GQA: N=4, K=2)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_matches_explicit_projection_and_softmax():
    q, k, v = _qkv(t=12, seed=1)
    e = _normal(5, 2, 4, 12) / 2  # per kv head, k=4 < n=12
    f = _normal(6, 2, 4, 12) / 2
    got = linformer_attention(q, k, v, e, f)
    # eq. 7 per head i, written directly: softmax(Q_i (E_i K_i)^T / sqrt(d)) (F_i V_i)
    kp = jnp.einsum("kps,bskh->bpkh", e, k)
    vp = jnp.einsum("kps,bskh->bpkh", f, v)
    want = np.zeros(got.shape, np.float32)
    for i in range(4):
        g = i // 2
        s_BTP = jnp.einsum("bth,bph->btp", q[:, :, i], kp[:, :, g]) / np.sqrt(8)
        want[:, :, i] = jnp.einsum("btp,bph->bth", jax.nn.softmax(s_BTP, -1), vp[:, :, g])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_shorter_input_equals_zero_padding_and_kv_sharing():
    q, k, v = _qkv(t=10, seed=2)
    e = _normal(3, 5, 16)
    got = linformer_attention(q, k, v, e)  # f = e
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 6), (0, 0), (0, 0)))  # noqa: E731
    want = linformer_attention(q, pad(k), pad(v), e, e)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_scores_are_n_by_k():
    q, k, _ = _qkv(t=64, seed=4)
    e = _normal(10, 8, 64)
    s = linformer_scores(q, k, e)
    assert s.shape == (2, 4, 64, 8)  # [B, N, n, k], not [.., n, n]
    kp = linformer_project(k, e)
    want = jnp.einsum("btnh,bpnh->bntp", q, jnp.repeat(kp, 2, axis=2)) / np.sqrt(8)
    np.testing.assert_allclose(s, want, atol=1e-4, rtol=1e-5)
    # no intermediate of the op is n x n
    jaxpr = jax.make_jaxpr(lambda *a: linformer_attention(*a, implementation="xla"))(q, k, k, e)
    for eq in jaxpr.eqns:
        for o in eq.outvars:
            shape = tuple(o.aval.shape)
            assert shape.count(64) <= 1, (eq.primitive, shape)


@pytest.mark.parametrize(
    "e_shape, match",
    [((4,), "e must be"), ((3, 4, 16), "e has 3 heads"), ((4, 8), "shorter than the input")],
)
def test_bad_projection_names_argument(e_shape, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        linformer_attention(q, k, v, jnp.ones(e_shape))


def test_bad_operands_and_mismatched_f():
    q, k, v = _qkv()
    e = jnp.ones((4, 16))
    with pytest.raises(ValueError, match="f to 5: must match"):
        linformer_attention(q, k, v, e, jnp.ones((5, 16)))
    with pytest.raises(ValueError, match="q must be 4-D"):
        linformer_attention(q[0], k, v, e)
    with pytest.raises(ValueError, match="must divide query heads"):
        linformer_attention(q[:, :, :3], k, v, e)


def _layer(**kw):
    cfg = dict(d_model=32, num_heads=4, num_kv_heads=2, seq_len=16, proj_len=4)
    return LinformerConfig(**(cfg | kw)).build(rngs=nnx.Rngs(0))


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_layer_equals_op_on_its_projections(sharing):
    layer = _layer(sharing=sharing)
    x = _normal(1, 2, 12, 32)
    y = layer(x)
    assert y.shape == (2, 12, 32)
    q, k, v = layer.q(x), layer.k(x), layer.v(x)
    f = layer.e if sharing == "kv" else layer.f
    o = linformer_attention(q, k, v, layer.e[...], f[...])
    np.testing.assert_allclose(y, layer.o(o), atol=1e-5, rtol=1e-5)
    want_e = (2, 4, 16) if sharing == "none" else (4, 16)
    assert layer.e.shape == want_e and hasattr(layer, "f") == (sharing != "kv")
    # bidirectional: the first output changes when only the last token changes
    y2 = layer(x.at[:, -1].add(1.0))
    assert not np.allclose(y[:, 0], y2[:, 0])


def test_kind_is_registered_and_refuses_causal_use():
    assert "linformer" in registered_kinds() and kind_config("linformer") is LinformerConfig
    with pytest.raises(ValueError, match="cannot serve a causal decoder model"):
        LinformerConfig.from_model(object(), 0)
    layer = _layer()
    with pytest.raises(NotImplementedError, match="no cache and no decode"):
        layer.init_cache(2, 16)
    with pytest.raises(NotImplementedError, match="no cache and no decode"):
        layer.decode(jnp.zeros((2, 1, 32)), None)
    with pytest.raises(ValueError, match="exceeds LinformerConfig.seq_len=16"):
        layer(jnp.zeros((1, 17, 32)))
    with pytest.raises(ValueError, match="sharing='x'"):
        LinformerConfig(d_model=32, num_heads=4, seq_len=16, proj_len=4, sharing="x")
    with pytest.raises(ValueError, match="proj_len"):
        LinformerConfig(d_model=32, num_heads=4, seq_len=16, proj_len=0)


def test_decoder_model_with_linformer_layer_is_refused():
    import dataclasses

    from models import DecoderLM, get_config
    from models.configs import LayerSpec

    spec = LayerSpec.of("linformer", seq_len=16, proj_len=4)
    with pytest.raises(ValueError, match="'linformer' .* cannot serve a causal decoder model"):
        cfg = dataclasses.replace(get_config("llama-tiny"), layer_pattern=(spec,))
        DecoderLM(cfg, rngs=nnx.Rngs(0))


def test_gradients_match_softmax_attention_at_identity():
    q, k, v = _qkv(t=8, seed=7)
    eye = jnp.eye(8)
    ours = jax.grad(
        lambda *a: jnp.sum(jnp.sin(linformer_attention(*a, eye, eye, implementation="xla"))),
        argnums=(0, 1, 2),
    )(q, k, v)
    oracle = jax.grad(
        lambda *a: jnp.sum(jnp.sin(jax.nn.dot_product_attention(*a))), argnums=(0, 1, 2)
    )(q, k, v)
    for a, b in zip(ours, oracle):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)
