"""PrFlashAttention (jaxattn.ops.prflash): every block selected == exact causal attention; the
block-sampling distribution is respected empirically; the diagonal is always kept and no
future block ever; sampled lists equal the dense-masked op; bad probabilities are refused."""

import jax
import numpy as np
import pytest
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn import dot_product_attention, masks
from jaxattn.ops import prflash


def _qkv(T=40):
    return normal(0, *((2, T, n, 8) for n in (4, 2, 2)))


def test_every_block_is_exact_causal_and_sampled_lists_equal_dense_mask():
    q, k, v = _qkv()

    @fast_jit  # one compile for the four calls
    def run(q, k, v):
        every = prflash.prflash_attention(q, k, v, jax.random.key(1), [1.0], block=8)
        exact = dot_product_attention(q, k, v, mask=masks.Causal(), implementation="xla")
        vis = prflash.sample_block_visits(
            jax.random.key(2), [1.0, 0.5, 0.2], batch=2, kv_heads=2, num_blocks=5, block=8
        )
        sampled = [
            dot_product_attention(q, k, v, mask=masks.Causal(), block_visits=vis, **impl)
            for impl in ({}, dict(implementation="xla"))
        ]
        return every, exact, sampled

    every, exact, (sampled, sampled_xla) = run(q, k, v)
    np.testing.assert_allclose(every, exact, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(sampled, sampled_xla, atol=2e-5, rtol=2e-5)


def test_sampling_distribution_is_respected():
    pi = [1.0, 0.7, 0.3, 0.1]
    vis = prflash.sample_block_visits(
        jax.random.key(3), pi, batch=64, kv_heads=4, num_blocks=12, block=4
    )
    member = np.asarray(vis.membership(12))  # [B, K, r, c]
    r, c = np.arange(12)[:, None], np.arange(12)[None]
    assert member[..., c > r].sum() == 0 and member[..., r == c].all()
    for d, p in enumerate(pi[1:] + [pi[-1]] * 2, start=1):
        freq = member[..., (r - c) == d].mean()
        assert abs(freq - p) < 0.03, (d, freq, p)
    with pytest.raises(ValueError, match="keep_prob_by_distance must be"):
        prflash.sample_block_visits(
            jax.random.key(0), [1.2], batch=1, kv_heads=1, num_blocks=2, block=4
        )
