"""LM-Infinite (jaxattn.ops.lm_infinite and the "lm_infinite" kind): equals the dense
reference with an explicit Λ mask and per-pair capped RoPE distances, forward and backward;
shorter than the window == vanilla causal RoPE attention; distances past the cap are clipped;
prefill + steps == forward in a DecoderLM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn import dot_product_attention, masks
from jaxattn.layers import LMInfiniteConfig
from jaxattn.ops import RopeConfig, apply_rope
from jaxattn.ops.lm_infinite import lm_infinite_attention, lm_infinite_reference
from models import DecoderLM, LayerSpec, get_config

ROPE = RopeConfig(theta=100.0)
TOL = dict(atol=2e-5, rtol=2e-5)


def _qkv(seed, B=2, T=37, K=2, G=2, H=16):
    return tuple(normal(seed, (B, T, K * G, H), (B, T, K, H), (B, T, K, H), (B, T, K * G, H)))


def _fast(q, k, v, **kw):
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    q_rot, k_rot = apply_rope(q, pos, ROPE), apply_rope(k, pos, ROPE)
    return lm_infinite_attention(q_rot, q, k_rot, v, rope=ROPE, **kw)


def _fast_and_reference(q, k, v, do, *, n_global, n_local):
    fn = functools.partial(_fast_and_reference_fn, n_global=n_global, n_local=n_local)
    return fast_jit(fn)(q, k, v, do)


def _fast_and_reference_fn(q, k, v, do, *, n_global, n_local):
    """Value and (dq, dk, dv) of the fast op and of the dense reference, in one compiled call."""
    kw = dict(n_global=n_global, n_local=n_local)
    ref = lambda q, k, v: lm_infinite_reference(q, k, v, rope=ROPE, **kw)  # noqa: E731
    fast = lambda q, k, v: _fast(q, k, v, **kw)  # noqa: E731
    return tuple(
        jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * do), argnums=(0, 1, 2))(q, k, v)
        for f in (fast, ref)
    )


@pytest.mark.parametrize("n_global, n_local", [(3, 8), (0, 5), (4, 1)])
def test_equals_explicit_lambda_mask_and_capped_distances(n_global, n_local):
    q, k, v, do = _qkv(n_local)
    got, want = _fast_and_reference(q, k, v, do, n_global=n_global, n_local=n_local)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for name, g, w in zip(("dq", "dk", "dv"), got[1], want[1]):
        np.testing.assert_allclose(g, w, err_msg=name, **TOL)


def test_shorter_than_window_is_vanilla_causal_rope():
    q, k, v, _ = _qkv(1, T=20)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))

    @jax.jit  # one compile for both
    def both(q, k, v):
        q_rot, k_rot = apply_rope(q, pos, ROPE), apply_rope(k, pos, ROPE)
        vanilla = dot_product_attention(q_rot, k_rot, v, mask=masks.Causal())
        return _fast(q, k, v, n_global=4, n_local=20), vanilla

    got, want = both(q, k, v)
    np.testing.assert_allclose(got, want, **TOL)


def test_distances_past_the_cap_are_clipped():
    """One query vector at every position and one sink key: its logit (read from a one-key
    value) is the same for every query beyond the window: distance n_local, not p - j."""
    T, n_local = 30, 6
    q, k = normal(0, (1, 1, 1, 16), (1, T, 1, 16))
    q = jnp.broadcast_to(q, (1, T, 1, 16))
    # values: sink 0 carries 1, every other key 0 -> o = the softmax weight of the sink
    v = jnp.zeros((1, T, 1, 16)).at[:, 0].set(1.0)
    k = k.at[:, 1:].set(0.0)  # other keys: logit 0, so the sink's weight reveals its logit
    kw = dict(n_global=1, n_local=n_local)
    o, ref = jax.jit(  # one compile for both
        lambda q, k, v: (_fast(q, k, v, **kw), lm_infinite_reference(q, k, v, rope=ROPE, **kw))
    )(q, k, v)
    o, ref = o[0, :, 0, 0], ref[0, :, 0, 0]
    far = np.asarray(o[n_local:])  # p - 0 >= n_local: one capped distance, window of n_local
    np.testing.assert_allclose(far, far[0], rtol=1e-5)
    np.testing.assert_allclose(o, ref, **TOL)


def test_kind_decode_equals_forward_and_bad_config():
    config = get_config(
        "llama-tiny",
        num_layers=1,
        layer_pattern=(LayerSpec.of("lm_infinite", n_global=2, n_local=4),),
    )
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 13)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(decode_all(model, tokens), full, atol=3e-5, rtol=3e-5)
    with pytest.raises(ValueError, match="rope is required"):
        LMInfiniteConfig(d_model=32, num_heads=4)
    with pytest.raises(ValueError, match="n_local=0"):
        LMInfiniteConfig(d_model=32, num_heads=4, rope=ROPE, n_local=0)
