"""Landmark attention (jaxattn.ops.landmark and the "landmark" kind), PAPERS.md §3's faithful
tests: the training form equals the paper's grouped softmax (§3.1: GroupedSoftmax over the own
block's tokens and the earlier landmarks, each earlier block its own group, its tokens' weights
multiplied by its landmark's probability, landmarks weighted 0), written here per query as a
plain numpy loop; the block-visit implementation equals the dense reference forward and
backward; retrieving every block equals the training form; top-k retrieval returns the blocks
with the highest landmark scores and equals the grouped softmax over them; prefill + steps ==
forward in a DecoderLM; bad input names the argument."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn.layers import LandmarkConfig, registered_kinds
from jaxattn.ops.landmark import (
    landmark_attention,
    landmark_reference,
    landmark_scores,
    landmark_select,
)
from models import DecoderLM, LayerSpec, get_config

TOL = dict(atol=2e-5, rtol=2e-5)
BLOCK = 5  # 4 tokens + a landmark; T = 23 ends inside a block (no landmark yet)


def _qkv(seed, B=2, T=23, K=2, G=2, H=16):
    return tuple(normal(seed, (B, T, K * G, H), (B, T, K, H), (B, T, K, H), (B, T, K * G, H)))


def _paper_loop(q, k, v, block, retrieved=None):
    """The paper's grouped softmax, one query at a time (numpy, fp64). retrieved[b, i, n] is
    the set of earlier blocks query i of head n may use (None: all)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros((B, T, N, v.shape[-1]))

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    for b, i, n in np.ndindex(B, T, N):
        s = k[b, :, n // G] @ q[b, i, n] / np.sqrt(H)
        p = i // block
        blocks = range(p) if retrieved is None else sorted(retrieved[b][i][n])
        own = [j for j in range(p * block, i + 1) if j % block != block - 1]
        landmarks = [(c + 1) * block - 1 for c in blocks]
        S = softmax(s[own + landmarks])  # the own group: own tokens and earlier landmarks
        o = S[: len(own)] @ v[b, own, n // G]
        for gate, c in zip(S[len(own) :], blocks):  # each earlier block: its own group
            toks = list(range(c * block, (c + 1) * block - 1))
            o = o + gate * (softmax(s[toks]) @ v[b, toks, n // G])
        out[b, i, n] = o
    return out


def _fast_and_reference(q, k, v, do, retrieved, *, top_k, all_k=None):
    return fast_jit(functools.partial(_fast_and_reference_fn, top_k=top_k, all_k=all_k))(
        q, k, v, do, retrieved
    )


def _fast_and_reference_fn(q, k, v, do, retrieved, *, top_k, all_k=None):
    """(o, (dq, dk, dv)) of the block-visit op and of the dense reference, and the op's output
    with top_k = all_k (if given), in one compile."""
    fast = lambda q, k, v: landmark_attention(q, k, v, block=BLOCK, top_k=top_k)  # noqa: E731
    ref = lambda q, k, v: landmark_reference(  # noqa: E731
        q, k, v, block=BLOCK, retrieved_BTNL=retrieved
    )

    def vg(f):
        def loss(*a):
            o = f(*a)
            return jnp.sum(o * do), o

        (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return o, grads

    extra = None if all_k is None else landmark_attention(q, k, v, block=BLOCK, top_k=all_k)
    return vg(fast), vg(ref), extra


def _close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)


@pytest.mark.parametrize("G", [1, 4])
def test_training_form_equals_the_papers_grouped_softmax(G):
    q, k, v, do = _qkv(G, K=4 // G, G=G)
    (o, grads), (ref, grads_ref), all_blocks = _fast_and_reference(
        q, k, v, do, None, top_k=None, all_k=q.shape[1] // BLOCK
    )
    np.testing.assert_allclose(ref, _paper_loop(q, k, v, BLOCK), **TOL)
    _close((o, grads), (ref, grads_ref))
    assert np.abs(np.asarray(grads[1])[:, BLOCK - 1 :: BLOCK]).max() > 0  # landmark keys train
    np.testing.assert_allclose(all_blocks, ref, **TOL)  # every block retrieved == training form


def test_top_k_retrieves_the_highest_landmark_scores():
    q, k, v, do = _qkv(7)
    B, T, N, H = q.shape
    K, top_k, nl = k.shape[2], 2, T // BLOCK
    idx, valid = jax.jit(
        lambda q, k: landmark_select(landmark_scores(q, k, block=BLOCK), num_kv_heads=K, top_k=2)
    )(q, k)
    idx, valid = np.asarray(idx), np.asarray(valid)  # numpy: no eager jax indexing below
    # numpy: softmax over the earlier landmarks per query head, max over the group, top 2
    s = np.einsum("btnh,blnh->btnl", q, np.repeat(k[:, BLOCK - 1 :: BLOCK], N // K, 2)) / 4.0
    retrieved = [[[set() for _ in range(N)] for _ in range(T)] for _ in range(B)]
    mask = np.zeros((B, T, N, nl), bool)
    for b, i, kh in np.ndindex(B, T, K):
        p = i // BLOCK
        if p == 0:
            assert not valid[b, i, kh].any()
            continue
        e = np.exp(s[b, i, kh * 2 : kh * 2 + 2, :p])
        prob = (e / e.sum(-1, keepdims=True)).max(0)
        want = set(np.argsort(-prob)[: min(top_k, p)].tolist())
        got = set(idx[b, i, kh][valid[b, i, kh]].tolist())
        assert got == want, (b, i, kh)
        for n in range(kh * 2, kh * 2 + 2):
            retrieved[b][i][n] = want
            mask[b, i, n, list(want)] = True
    (o, grads), (o_ref, grads_ref), _ = _fast_and_reference(
        q, k, v, do, jnp.asarray(mask), top_k=top_k
    )
    _close((o, grads), (o_ref, grads_ref))
    np.testing.assert_allclose(o, _paper_loop(q, k, v, BLOCK, retrieved), **TOL)


def test_kind_decode_equals_forward_and_bad_input():
    assert "landmark" in registered_kinds()
    config = get_config(
        "llama-tiny", num_layers=1, layer_pattern=(LayerSpec.of("landmark", block=3, top_k=2),)
    )
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    assert type(model.layers[0].attn.config) is LandmarkConfig
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 14)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(decode_all(model, tokens), full, atol=3e-5, rtol=3e-5)
    q, k, v, _ = _qkv(0, T=10)
    with pytest.raises(ValueError, match="block=1"):
        landmark_attention(q, k, v, block=1)
    with pytest.raises(ValueError, match=r"top_k=3 must be None or an int in \[1, landmarks=2\]"):
        landmark_attention(q, k, v, block=BLOCK, top_k=3)
    with pytest.raises(ValueError, match="top_k=0"):
        LandmarkConfig(d_model=32, num_heads=4, top_k=0)
    with pytest.raises(ValueError, match="not landmark-attention options"):
        LandmarkConfig(d_model=32, num_heads=4, sliding_window=8)
