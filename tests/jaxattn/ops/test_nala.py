"""NaLaFormer's norm-aware feature maps (jaxattn.ops.nala) in the linear-attention op and kind.

* φ_q, φ_k == the equations written in numpy: the norm-direction split d(q) = q / ‖q‖, the
  power p(‖q‖) = λ (1/2 + tanh ‖q‖), the norm-preserving split ψ(x) = [relu(x), relu(-x)],
  φ_q(q) = ψ(d(q))^p(‖q‖), φ_k(k) = ψ(k³);
* feature-mapped q and k are non-negative; ψ keeps vector norms;
* with feature_map="nala": chunked == naive == recurrent (outputs, states, gradients);
* spikiness: the op's attention distribution of one query direction over fixed keys has an
  entropy that falls as ‖q‖ grows;
* the "linear" kind with feature_map="nala": prefill + decode steps == forward, state [B, K,
  2H, H + 1]; bad combinations name the field.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.layers import LinearAttentionConfig
from jaxattn.ops import linear_attention
from jaxattn.ops.nala import nala_key_map, nala_query_map, norm_preserving_split

TOL = dict(atol=2e-5, rtol=2e-5)


def _np_phi_q(q, lam=3.0):
    """Paper: q = ‖q‖ d(q); φ_q(q) = ψ(d(q)) ** p(‖q‖), p(‖q‖) = λ (1/2 + tanh ‖q‖)."""
    q = np.asarray(q, np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)  # norm-direction split
    d = q / norm
    psi = np.concatenate([np.maximum(d, 0), np.maximum(-d, 0)], axis=-1)  # ψ
    p = lam * (0.5 + np.tanh(norm))  # query-norm-aware power
    return psi**p


def _np_phi_k(k):
    """φ_k(k) = ψ(k³)."""
    k3 = np.asarray(k, np.float64) ** 3
    return np.concatenate([np.maximum(k3, 0), np.maximum(-k3, 0)], axis=-1)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_feature_maps_equal_the_papers_equations():
    q, k = _rand(3, 5, 16), _rand(3, 5, 16, seed=1)
    np.testing.assert_allclose(nala_query_map(q), _np_phi_q(q), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nala_query_map(q, lam=1.5), _np_phi_q(q, 1.5), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nala_key_map(k), _np_phi_k(k), rtol=1e-5, atol=1e-6)
    assert nala_query_map(q).shape == (3, 5, 32) and nala_key_map(k).shape == (3, 5, 32)


def test_mapped_q_and_k_are_non_negative_and_the_split_keeps_norms():
    x = _rand(4, 7, 16, seed=2) * 3
    for phi in (nala_query_map, nala_key_map, norm_preserving_split):
        assert float(jnp.min(phi(x))) >= 0.0
    np.testing.assert_allclose(
        jnp.linalg.norm(norm_preserving_split(x), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6
    )
    # ψ's inner product keeps the same-sign (positive cosine) terms of x·y, drops the others
    y = _rand(4, 7, 16, seed=3)
    same = np.sum(np.where(x * y > 0, x * y, 0.0), axis=-1)
    got = jnp.sum(norm_preserving_split(x) * norm_preserving_split(y), axis=-1)
    np.testing.assert_allclose(got, same, rtol=1e-5, atol=1e-5)
    # q = 0 maps to zeros, with finite gradients (the power is masked where ψ is 0)
    assert float(jnp.max(jnp.abs(nala_query_map(jnp.zeros((2, 8)))))) == 0.0
    g = jax.grad(lambda q: jnp.sum(nala_query_map(q)))(jnp.asarray(x))
    assert bool(jnp.all(jnp.isfinite(g)))


def _run(q, k, v, impl, **kw):
    return linear_attention(
        q, k, v, feature_map="nala", normalize=True, implementation=impl, chunk_size=4,
        return_state=True, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("variant", ["linear_attn", "simple_gla"])
def test_chunked_naive_and_recurrent_agree_with_nala(variant):
    b, t, n, kh, h = 2, 11, 4, 2, 8
    q, k, v = (jnp.asarray(_rand(b, t, m, h, seed=s)) for s, m in ((0, n), (1, kh), (2, kh)))
    kw = {}
    if variant == "simple_gla":
        kw["log_decay"] = jnp.asarray(-np.random.default_rng(3).uniform(0.01, 0.5, (b, t, kh)))
    kw["variant"] = variant
    ct = jnp.asarray(_rand(b, t, n, h, seed=4))

    def loss(q, k, v, impl):
        o, s = _run(q, k, v, impl, **kw)
        return jnp.sum(o * ct) + jnp.sum(jnp.sin(s)), (o, s)

    res = {
        impl: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)(
            q, k, v, impl
        )
        for impl in ("naive", "chunked", "recurrent")
    }
    (_, (o_ref, s_ref)), g_ref = res["naive"]
    assert s_ref.shape == (b, kh, 2 * h, h + 1)
    for impl in ("chunked", "recurrent"):
        (_, (o, s)), g = res[impl]
        np.testing.assert_allclose(o, o_ref, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(s, s_ref, atol=1e-4, rtol=1e-4)
        for a, r in zip(g, g_ref):
            assert bool(jnp.all(jnp.isfinite(a)))
            np.testing.assert_allclose(a, r, atol=2e-4, rtol=2e-4)


def _entropy(p):
    p = np.asarray(p, np.float64)
    return float(-np.sum(p * np.log(np.maximum(p, 1e-30))))


def test_attention_entropy_falls_as_the_query_norm_grows():
    """One query direction at norms 0.1 .. 4 over 12 fixed keys; values = one-hot positions,
    so the op's normalised output at the last step is the attention distribution itself."""
    t, h = 12, 8
    k = jnp.asarray(_rand(1, t, 1, h, seed=5))
    v = jnp.eye(t, dtype=jnp.float32)[None, :, None, :]
    direction = _rand(h, seed=6)
    direction /= np.linalg.norm(direction)
    # jitted, q traced: one compile per feature map (eager dispatches the chunked op per norm)
    last = jax.jit(
        lambda q, fm: linear_attention(q, k, v, feature_map=fm, normalize=True)[0, -1, 0],
        static_argnums=1,
    )
    entropies, linear_entropies = [], []
    for norm in (0.1, 0.5, 1.0, 2.0, 4.0):
        q = jnp.broadcast_to(jnp.asarray(norm * direction), (1, t, 1, h))
        attn = last(q, "nala")
        np.testing.assert_allclose(float(jnp.sum(attn)), 1.0, rtol=1e-5)
        entropies.append(_entropy(attn))
        linear_entropies.append(_entropy(last(q, "elu+1")))
    assert all(a > b + 1e-3 for a, b in zip(entropies, entropies[1:])), entropies
    # a norm-unaware map gets no such control: scaling q by 40x barely moves elu+1's entropy
    # compared with NaLa's drop
    assert entropies[0] - entropies[-1] > 3 * abs(linear_entropies[0] - linear_entropies[-1])


def test_linear_kind_with_nala_prefill_and_decode_equal_forward():
    config = LinearAttentionConfig(
        d_model=32, num_heads=4, num_kv_heads=2, variant="linear_attn", feature_map="nala",
        normalize=True, chunk_size=4,
    )  # fmt: skip
    layer = config.build(rngs=nnx.Rngs(1))
    x = jnp.asarray(_rand(2, 9, 32, seed=7))
    full = nnx.jit(lambda m, x: m(x))(layer, x)
    cache = layer.init_cache(2, 0)
    assert cache.state_BKHV.shape == (2, 2, 16, 9)
    step = nnx.jit(lambda m, x, c: m.decode(x, c))
    o, cache = step(layer, x[:, :6], cache)
    outs = [o]
    for i in range(6, 9):
        o, cache = step(layer, x[:, i : i + 1], cache)
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
    assert bool(jnp.all(jnp.isfinite(full)))


def test_bad_nala_combinations_name_the_field():
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttentionConfig(d_model=32, num_heads=4, variant="gla", feature_map="nala")
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="gla"):
        linear_attention(q, q, q, variant="gla", log_decay=-jnp.ones((1, 4, 2, 8)),
                         feature_map="nala")  # fmt: skip
    with pytest.raises(ValueError, match="initial_state"):  # the state is [B, K, 2H, V]
        linear_attention(q, q, q, feature_map="nala", initial_state=jnp.zeros((1, 2, 8, 8)))
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, q, q, feature_map=(nala_query_map,))
