"""Attention (MHA / GQA / MQA / SQA) and MLA layers against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import Attention, AttentionConfig, MLAConfig, MultiHeadLatentAttention
from jaxattn.ops.rope import RopeConfig

D = 32
X = jax.random.normal(jax.random.key(0), (2, 9, D))


@nnx.jit
def _call(layer, x):
    return layer(x)


@nnx.jit(static_argnums=2)
def _prefill_then_steps(layer, x_BTD, prefill):
    """Decode x with a cache: ``prefill`` tokens at once, then one token per scan step."""
    cache = layer.init_cache(x_BTD.shape[0], 16, jnp.float32)
    first, cache = layer.decode(x_BTD[:, :prefill], cache)

    def step(cache, x_B1D):
        out, cache = layer.decode(x_B1D[:, None], cache)
        return cache, out[:, 0]

    cache, rest = jax.lax.scan(step, cache, jnp.swapaxes(x_BTD[:, prefill:], 0, 1))
    return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], 1), cache


def _reference(layer: Attention, x_BTD, window=None):
    """Repeat kv heads and call jax.nn.dot_product_attention (no RoPE in these configs)."""
    c = layer.config
    q = jnp.einsum("btd,dnh->btnh", x_BTD, layer.q.kernel[...])
    k = jnp.einsum("btd,dkh->btkh", x_BTD, layer.k.kernel[...])
    v = jnp.einsum("btd,dkv->btkv", x_BTD, layer.v.kernel[...])
    g = c.n_q // c.n_kv
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    local = None if window is None else (window - 1, 0)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)
    return jnp.einsum("btnv,nvd->btd", o, layer.o.kernel[...])


@pytest.mark.parametrize(
    "n, k, nq",
    [(4, 4, None), (4, 2, None), (4, 1, None), (8, 2, 4), (8, 1, 2)],
    ids=["mha", "gqa", "mqa", "sqa_gqa", "sqa_mqa"],
)
def test_attention_matches_reference(n, k, nq):
    cfg = AttentionConfig(d_model=D, num_heads=n, num_kv_heads=k, num_query_heads=nq)
    layer = Attention(cfg, rngs=nnx.Rngs(0))
    assert layer.q.kernel.shape == (D, nq or n, D // n)
    assert layer.k.kernel.shape == (D, k, D // n)
    np.testing.assert_allclose(_call(layer, X), _reference(layer, X), atol=1e-5)


def test_sqa_with_all_query_heads_is_mha():
    mha = Attention(AttentionConfig(d_model=D, num_heads=4), rngs=nnx.Rngs(0))
    sqa = Attention(AttentionConfig(d_model=D, num_heads=4, num_query_heads=4), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_call(mha, X), _call(sqa, X))


def test_sqa_score_flops_scale_with_query_heads():
    from jaxattn import dot_product_attention
    from jaxattn.masks import Causal

    def flops(nq):
        q, k = jnp.zeros((1, 256, nq, 8)), jnp.zeros((1, 256, 2, 8))
        f = jax.jit(
            lambda q, k: dot_product_attention(q, k, k, mask=Causal(), implementation="xla")
        )
        cost = f.lower(q, k).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops(4) == pytest.approx(flops(8) / 2, rel=0.05)


def test_sliding_window_and_decode_match_full():
    cfg = AttentionConfig(
        d_model=D,
        num_heads=4,
        num_kv_heads=2,
        sliding_window=3,
        rope=RopeConfig(theta=100.0),
        qk_norm=True,
        qkv_bias=True,
        o_bias=True,
    )
    layer = Attention(cfg, rngs=nnx.Rngs(1))
    out, cache = _prefill_then_steps(layer, X, 5)
    np.testing.assert_allclose(out, _call(layer, X), atol=1e-5)
    assert cache.bytes_per_token() == 2 * 2 * 8 * 4


def test_window_without_rope_matches_reference():
    cfg = AttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, sliding_window=3)
    layer = Attention(cfg, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(_call(layer, X), _reference(layer, X, window=3), atol=1e-5)


def _mla(q_lora_rank, layout="interleaved"):
    cfg = MLAConfig(
        d_model=D,
        num_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=12,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=5,
        rope=RopeConfig(theta=100.0, layout=layout),
    )
    return MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(2))


@pytest.mark.parametrize(
    "q_lora_rank, layout", [(0, "interleaved"), (8, "interleaved_to_split_half")]
)
def test_mla_absorbed_decode_equals_naive(q_lora_rank, layout):
    layer = _mla(q_lora_rank, layout)
    naive = _call(layer, X)
    absorbed, _ = _prefill_then_steps(layer, X, 9)  # absorbed, whole sequence at once
    np.testing.assert_allclose(absorbed, naive, atol=1e-5)
    stepped, cache = _prefill_then_steps(layer, X, 4)  # absorbed, prefill 4 then 5 steps
    np.testing.assert_allclose(stepped, naive, atol=1e-5)
    assert cache.bytes_per_token() == (12 + 4) * 4


def test_mla_naive_matches_explicit_formula():
    layer = _mla(0)
    c = layer.config
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    from jaxattn.ops.rope import apply_rope

    q = jnp.einsum("btd,dnh->btnh", X, layer.q.kernel[...])
    q_nope, q_pe = q[..., :6], apply_rope(q[..., 6:], pos, c.rope)
    kv = X @ layer.kv_a.kernel[...]
    lat = kv[..., :12] / jnp.sqrt(jnp.mean(kv[..., :12] ** 2, -1, keepdims=True) + 1e-6)
    lat = lat * layer.kv_norm.scale[...]
    k_pe = apply_rope(kv[:, :, None, 12:], pos, c.rope)[:, :, 0]
    k_nope = jnp.einsum("bsl,lnh->bsnh", lat, layer.k_b.kernel[...])
    v = jnp.einsum("bsl,lnv->bsnv", lat, layer.v_b.kernel[...])
    s = (
        jnp.einsum("btnh,bsnh->bnts", q_nope, k_nope) + jnp.einsum("btnp,bsp->bnts", q_pe, k_pe)
    ) / np.sqrt(10.0)
    s = jnp.where(jnp.tril(jnp.ones((9, 9), bool)), s, -jnp.inf)
    o = jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(s, -1), v)
    np.testing.assert_allclose(
        _call(layer, X), jnp.einsum("btnv,nvd->btd", o, layer.o.kernel[...]), atol=1e-5
    )


def test_layers_are_differentiable():
    layer = _mla(8)

    def loss(layer):
        return jnp.sum(layer(X) ** 2)

    grads = nnx.jit(nnx.grad(loss))(layer)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_heads=5), "num_heads"),
        (dict(num_heads=4, num_query_heads=6), "num_query_heads"),
        (dict(num_heads=4, sliding_window=0), "sliding_window"),
        (dict(num_heads=4, rope=RopeConfig(rotary_dim=16)), "rotary_dim"),
    ],
)
def test_bad_attention_config(kw, field):
    with pytest.raises(ValueError, match=field):
        AttentionConfig(d_model=D, **kw)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(qk_rope_head_dim=3), "qk_rope_head_dim"),
        (dict(q_lora_rank=-2), "q_lora_rank"),
        (dict(rope=RopeConfig(rotary_dim=2)), "rotary_dim"),
    ],
)
def test_bad_mla_config(kw, field):
    base = dict(
        d_model=D, num_heads=4, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4
    )
    with pytest.raises(ValueError, match=field):
        MLAConfig(**(base | kw))


@pytest.mark.parametrize(
    "config, kw",
    [
        ("AttentionConfig", {}),
        ("LinformerConfig", dict(seq_len=8, proj_len=4)),
        ("AgentAttentionConfig", dict(num_agents=4, seq_len=8)),
        ("LinearAttentionConfig", {}),
    ],
)
def test_head_split_refused_by_every_kind(config, kw):
    import jaxattn.layers as layers

    cls = getattr(layers, config)
    msg = f"{cls.__name__}: num_heads=3 must divide d_model=16 when head_dim is not given"
    with pytest.raises(ValueError, match=msg):
        cls(d_model=16, num_heads=3, **kw)
    assert cls(d_model=16, num_heads=3, head_dim=4, **kw).num_heads == 3  # given: any split
