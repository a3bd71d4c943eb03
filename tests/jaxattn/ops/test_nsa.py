"""NSA (jaxattn.ops.nsa): the fast path (three op calls, per-token visit lists in the kv-major
order) equals the naive gather-based reference for GQA groups 1, 2, 4, forward and backward
(gradients reach the gates, the compression map and its position embedding); queries at an
offset (decoding) too; selection rules and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn.ops import nsa

SIZES = dict(block=8, stride=4, sel_block=8, top_n=4, window=12)
TOL = dict(atol=2e-5, rtol=2e-5)


def _case(seed, B, T, S, K, G, H=16):
    l = SIZES["block"]
    q, k, v, gates, w, pos, do = normal(
        seed,
        (B, T, K * G, H),
        (B, S, K, H),
        (B, S, K, H),
        (B, T, K * G, 3),
        (2, l, H, H),
        (2, l, H),
        (B, T, K * G, H),
    )
    gates, w, pos = jax.nn.sigmoid(gates), w / np.sqrt(l * H), 0.1 * pos
    return (q, k, v, gates, w, pos), do


def _vg(fn, args, do, q_offset):
    def loss(q, k, v, gates, w, pos):
        phi = lambda i: lambda x: jnp.einsum("...lh,lho->...o", x, w[i])  # noqa: E731
        kc = nsa.compress(k, phi(0), pos[0], block=SIZES["block"], stride=SIZES["stride"])
        vc = nsa.compress(v, phi(1), pos[1], block=SIZES["block"], stride=SIZES["stride"])
        o = fn(q, k, v, gates, kc, vc, q_offset=q_offset, **SIZES)
        return jnp.sum(o * do), o

    (_, o), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(*args)
    return o, grads


@fast_jit
def _fast_and_reference(args, do):
    """(o, grads) of the fast path and of the gather reference, in one compiled call."""
    return tuple(_vg(fn, args, do, 0) for fn in (nsa.nsa_attention, nsa.nsa_reference))


@fast_jit
def _fast_and_reference_at(args, do, q_offset):
    return tuple(_vg(fn, args, do, q_offset) for fn in (nsa.nsa_attention, nsa.nsa_reference))


@functools.cache
def _group_case(G):
    """One case per GQA group size, shared by the tests below: inputs and both paths' results."""
    args, do = _case(G, B=2, T=37, S=37, K=2, G=G)  # T = 37: not a multiple of any block
    return args, do, _fast_and_reference(args, do)


@pytest.mark.parametrize("G", [1, 2, 4])
def test_fast_equals_gather_reference_fwd_bwd(G):
    _, _, ((o, grads), (o_ref, grads_ref)) = _group_case(G)
    np.testing.assert_allclose(o, o_ref, **TOL)
    names = ("dq", "dk", "dv", "dgates", "dphi", "dpos")
    for name, g, r in zip(names, grads, grads_ref):
        np.testing.assert_allclose(g, r, err_msg=name, **TOL)
    for name in ("dgates", "dphi", "dpos"):  # gradients reach the gates and the compression
        assert float(jnp.abs(grads[names.index(name)]).max()) > 0, name


def test_queries_at_an_offset_equal_the_full_sequence_rows():
    """Queries at positions q_offset[b] + t over S stored keys (decoding) give the rows of the
    full-sequence result, in both paths."""
    args, do, ((full, _), _) = _group_case(2)
    q, k, v, gates, w, pos = args
    starts = [33, 29]
    rows = lambda x: jnp.stack([x[b, o : o + 3] for b, o in enumerate(starts)])  # noqa: E731
    sub = (rows(q), k, v, rows(gates), w, pos)
    for got, _ in _fast_and_reference_at(sub, rows(do), jnp.array(starts)):
        np.testing.assert_allclose(got, rows(full), **TOL)


def test_selection_keeps_first_and_local_blocks_and_only_the_past():
    B, T, K, nsel, bs = 1, 40, 1, 5, 8
    scores = jnp.zeros((B, T, K, nsel)).at[..., 2].set(5.0)
    pos = jnp.arange(T)[None]
    idx, cnt = nsa.select_blocks(scores, pos, top_n=4, sel_block=bs)
    idx, cnt = np.asarray(idx[0, 0]), np.asarray(cnt[0, 0])
    for t in range(T):
        chosen = set(idx[t, : cnt[t]].tolist())
        assert cnt[t] == min(4, t // bs + 1)
        assert all(j * bs <= t for j in chosen)  # causal: no block starts after the token
        assert {0, t // bs} <= chosen and (t // bs == 0 or t // bs - 1 in chosen)
        if t // bs >= 3:  # the highest-scoring non-forced block wins the free slot
            assert 2 in chosen
    with pytest.raises(ValueError, match="top_n=6 must be in"):
        nsa.select_blocks(scores, pos, top_n=6, sel_block=bs)


def test_compression_equals_explicit_blocks():
    x, pos = normal(0, (1, 21, 2, 4), (8, 4))
    out = nsa.compress(x, lambda b: b.sum((-2, -1)), pos, block=8, stride=4)
    assert out.shape == (1, nsa.num_compressed(21, 8, 4), 2) == (1, 4, 2)
    want = [(x[0, i * 4 : i * 4 + 8] + pos[:, None]).sum((0, 2)) for i in range(4)]
    np.testing.assert_allclose(out[0], np.stack(want), rtol=1e-5)
