"""Attention dropout in the op ("xla" and "chunked"): rate 0 is bitwise no dropout; both
implementations drop the same entries for the same key (by construction: the keep-mask is a
function of batch row, head, query row and key), forward and backward, in every block layout;
the keep fraction and unbiasedness hold statistically; gradients pass a finite-difference
check at a fixed key; bad rates and keys raise; the other implementations refuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from visit_case import assert_close, inputs, op, random_visits, value_and_grads

from jaxattn import dot_product_attention as attention
from jaxattn import masks
from jaxattn.ops import ChunkedBlockSizes
from jaxattn.ops._attention_args import check_args
from jaxattn.ops.attention import _choose

TOL = dict(atol=5e-5, rtol=5e-5)
KEY = jax.random.key(42)


def test_rate_zero_is_exactly_no_dropout():
    q, k, v, do = inputs(0, 2, 40, 40, 4, 2, 16, 16)
    for impl in ("xla", "chunked"):
        base = value_and_grads(op(impl, mask=masks.Causal()), q, k, v, do)
        for kw in (dict(dropout_rate=0.0), dict(dropout_rate=0.0, dropout_rng=KEY)):
            got = value_and_grads(op(impl, mask=masks.Causal(), **kw), q, k, v, do)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(base)):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


LAYOUTS = {
    "blocks": dict(block_sizes=ChunkedBlockSizes(block_q=16, block_kv=24)),
    "one_block": {},
    "visits_gqa_kv3": "visits",
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chunked_drops_what_xla_drops(layout):
    B, T, S, N, K, Kv = 2, 45, 61, 6, 2, 2
    extra = LAYOUTS[layout]
    if extra == "visits":
        Kv = 3
        visits = random_visits(
            np.random.default_rng(0), Bv=B, Kv=K, T=T, S=S, block_q=15, block_kv=16, L=3
        )
        extra = dict(block_visits=visits)
    q, k, v, do = inputs(1, B, T, S, N, K, 16, 8, Kv=Kv)
    kw = dict(mask=masks.Causal(), q_offset=S - T, dropout_rate=0.3, dropout_rng=KEY)
    want = value_and_grads(op("xla", return_lse=True, **kw, **extra), q, k, v, do)
    got = value_and_grads(op("chunked", return_lse=True, **kw, **extra), q, k, v, do)
    for name, g, w in zip(
        ("o", "lse", "dq", "dk", "dv"), (*got[:2], *got[2]), (*want[:2], *want[2])
    ):
        assert_close(g, w, TOL, name)
    nodrop = value_and_grads(op("xla", mask=masks.Causal(), q_offset=S - T), q, k, v, do)
    assert not np.allclose(np.asarray(got[0]), np.asarray(nodrop[0]), atol=1e-3)
    other = value_and_grads(op("chunked", **{**kw, "dropout_rng": jax.random.key(7)}), q, k, v, do)
    assert not np.allclose(np.asarray(other[0]), np.asarray(got[0]), atol=1e-3)


def test_keep_fraction_and_unbiasedness():
    """With one-hot values (v[s] = e_s) the output is the dropped probability row itself."""
    B, T, S, N, rate = 1, 16, 32, 2, 0.25
    q, k, _, _ = inputs(3, B, T, S, N, N, 8, 8)
    v = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (B, S, N, S))

    def probs(key, impl):
        return attention(q, k, v, implementation=impl, dropout_rate=rate, dropout_rng=key)

    keys = jax.random.split(jax.random.key(0), 256)
    p_drop = jax.jit(jax.vmap(lambda key: probs(key, "chunked")))(keys)  # [keys, B, T, N, S]
    p = attention(q, k, v, implementation="xla")
    kept = np.asarray(p_drop != 0)
    assert abs(kept.mean() - (1 - rate)) < 0.01
    mean = np.asarray(p_drop).mean(0)
    # E[p_drop] = p: the sample mean's error is about sqrt(rate / (1 - rate) / 256) · p
    sd = np.sqrt(rate / (1 - rate) / len(keys)) * np.asarray(p)
    assert (np.abs(mean - np.asarray(p)) <= 5 * sd + 1e-6).mean() > 0.999
    # kept entries are scaled by 1 / (1 - rate) exactly
    ratio = np.asarray(p_drop)[kept] / np.broadcast_to(np.asarray(p), p_drop.shape)[kept]
    np.testing.assert_allclose(ratio, 1 / (1 - rate), rtol=1e-5)


def test_gradients_pass_finite_differences_at_a_fixed_key():
    q, k, v, _ = inputs(4, 1, 12, 20, 2, 1, 8, 8)
    for impl, bs in (("chunked", ChunkedBlockSizes(block_q=4, block_kv=8)), ("xla", None)):
        f = lambda q, k, v: attention(
            q, k, v, mask=masks.Causal(), q_offset=8, implementation=impl, block_sizes=bs,
            dropout_rate=0.4, dropout_rng=KEY,
        )  # fmt: skip
        check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dropout_rate=1.0, dropout_rng=KEY), r"dropout_rate must be in \[0, 1\)"),
        (dict(dropout_rate=-0.1, dropout_rng=KEY), r"dropout_rate must be in \[0, 1\)"),
        (dict(dropout_rate=True, dropout_rng=KEY), "dropout_rate must be a number"),
        (dict(dropout_rate="0.1", dropout_rng=KEY), "dropout_rate must be a number"),
        (dict(dropout_rate=0.1), "needs dropout_rng"),
        (dict(dropout_rate=0.1, dropout_rng=3), "dropout_rng must be a jax.random key"),
        (dict(dropout_rate=0.1, dropout_rng=jnp.zeros(3, jnp.uint32)), "raw uint32"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.split(KEY, 2)), "single key"),
    ],
)
def test_bad_dropout_raises(kw, match):
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=match):
        attention(q, q, q, **kw)


def test_other_implementations_refuse_and_auto_serves_dropout():
    q, k, v, _ = inputs(5, 1, 2, 300, 4, 2, 16, 16)
    kw = dict(dropout_rate=0.2, dropout_rng=KEY)
    with pytest.raises(NotImplementedError, match="dropout"):
        attention(q, k, v, implementation="decode", **kw)
    with pytest.raises(NotImplementedError, match="dropout|TPU"):
        attention(q, k, v, implementation="pallas_tpu", **kw)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda r: attention(q, k, v, dropout_rate=r, dropout_rng=KEY))(0.1)
    none = dict.fromkeys(("scale", "logits_soft_cap", "segment_ids", "q_offset", "kv_lengths"))
    a = check_args(q, k, v, mask=None, **none, **kw)
    assert _choose(a, q, k, v, False, None) == "chunked"  # T = 2 would pick "decode"
    assert_close(attention(q, k, v, **kw), attention(q, k, v, implementation="xla", **kw), TOL)
    # a raw uint32[2] key (jax.random.PRNGKey) works like its typed twin
    raw = jax.random.PRNGKey(1)
    assert_close(
        attention(q, k, v, dropout_rate=0.2, dropout_rng=raw, implementation="xla"),
        attention(
            q,
            k,
            v,
            dropout_rate=0.2,
            dropout_rng=jax.random.wrap_key_data(raw),
            implementation="xla",
        ),
        TOL,
    )
