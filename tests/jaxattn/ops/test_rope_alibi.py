"""RoPE + ALiBi (jaxattn.ops.rope_alibi): the combination equals an explicit numpy reference
and reduces to pure RoPE (slopes off) and pure ALiBi (rope off); with PrFlashAttention's
block-distance sampling, every block selected == exact causal, and sampled lists == the dense
reference under their mask; the LSE is that of the true scores; bad input."""

import jax
import numpy as np
import pytest
from visit_case import dense_from_visits, fast_jit, normal

from jaxattn import dot_product_attention
from jaxattn.masks import Causal
from jaxattn.ops import RopeConfig, apply_rope
from jaxattn.ops.prflash import sample_block_visits
from jaxattn.ops.rope_alibi import alibi_slopes, rope_alibi_attention

TOL = dict(atol=2e-5, rtol=2e-5)
B, T, K, G, H, V = 2, 24, 2, 2, 16, 8
ROPE = RopeConfig(theta=100.0)  # split_half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)


def _rope_np(x, pos, theta=100.0):
    inv = theta ** (-np.arange(0, H, 2) / H)
    ang = pos[:, :, None, None] * inv  # [B, T, 1, H/2]
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    c, s = np.cos(ang), np.sin(ang)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _reference(q, k, v, pos, slopes, rope, dense_BNTS):
    """numpy fp64: softmax_j(RoPE q_i · RoPE k_j / √H − m_n (p_i − p_j)) over the visible j;
    returns o and the LSE [B, N, T]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    if rope:
        q, k = _rope_np(q, pos), _rope_np(k, pos)
    k, v = np.repeat(k, G, 2), np.repeat(v, G, 2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    if slopes is not None:
        s = s - slopes[None, :, None, None] * (pos[:, None, :, None] - pos[:, None, None, :])
    s = np.where(dense_BNTS, s, -np.inf)
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - mx)
    lse = (np.log(p.sum(-1, keepdims=True)) + mx)[..., 0]
    return np.einsum("bnts,bsnv->btnv", p / p.sum(-1, keepdims=True), v), lse


def test_combination_and_its_reductions():
    q, k, v = normal(0, (B, T, K * G, H), (B, T, K, H), (B, T, K, V))
    pos = np.stack([np.arange(T), np.arange(T) * 2 + 3]).astype(np.int32)  # row 1: stride 2
    slopes = alibi_slopes(K * G, scale=0.5)
    causal = np.broadcast_to(np.tri(T, dtype=bool), (B, K * G, T, T))

    @fast_jit  # one compile for all four
    def run(q, k, v, pos):
        f = lambda **kw: rope_alibi_attention(  # noqa: E731
            q, k, v, positions_BT=pos, return_lse=True, implementation="xla", **kw
        )
        pure_rope = dot_product_attention(
            apply_rope(q, pos, ROPE), apply_rope(k, pos, ROPE), v, mask=Causal()
        )
        return f(rope=ROPE, slopes=slopes), f(rope=None, slopes=slopes), f(rope=ROPE), pure_rope

    both, alibi, rope, pure_rope = run(q, k, v, pos)
    for (o, lse), r, m in ((both, True, slopes), (alibi, False, slopes), (rope, True, None)):
        want_o, want_lse = _reference(q, k, v, pos, m, r, causal)
        np.testing.assert_allclose(o, want_o, **TOL)
        np.testing.assert_allclose(lse, want_lse, **TOL)
    np.testing.assert_allclose(rope[0], pure_rope, **TOL)  # slopes off: the op under RoPE
    assert np.abs(np.asarray(both[0]) - np.asarray(rope[0])).max() > 1e-2  # ALiBi matters
    assert np.abs(np.asarray(both[0]) - np.asarray(alibi[0])).max() > 1e-2  # RoPE matters
    geo = alibi_slopes(8, series="geometric")
    np.testing.assert_allclose(geo, 2.0 ** (-np.arange(1, 9)), rtol=1e-6)  # Press et al., N=8
    np.testing.assert_allclose(alibi_slopes(3), [1, 1 / 2, 1 / 3], rtol=1e-6)


def test_prflash_block_sampling_all_blocks_exact_and_sampled_lists():
    q, k, v = normal(1, (B, T, K * G, H), (B, T, K, H), (B, T, K, V))
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    slopes = alibi_slopes(K * G, series="geometric")
    sample = lambda key, pi: sample_block_visits(  # noqa: E731
        key, pi, batch=B, kv_heads=K, num_blocks=T // 8, block=8
    )
    every, some = sample(jax.random.key(0), [1.0]), sample(jax.random.key(1), [1.0, 0.5, 0.0])

    @fast_jit
    def run(q, k, v):
        f = lambda vis, impl: rope_alibi_attention(  # noqa: E731
            q, k, v, rope=ROPE, slopes=slopes, block_visits=vis, implementation=impl
        )
        return f(every, "chunked"), f(some, "chunked")

    all_blocks, sampled = run(q, k, v)
    causal = np.tri(T, dtype=bool)
    exact, _ = _reference(q, k, v, pos, slopes, True, np.broadcast_to(causal, (B, K * G, T, T)))
    np.testing.assert_allclose(all_blocks, exact, **TOL)  # every block selected == exact
    dense = dense_from_visits(some, B=B, N=K * G, K=K, T=T, S=T) & causal
    want, _ = _reference(q, k, v, pos, slopes, True, dense)
    np.testing.assert_allclose(sampled, want, **TOL)
    assert not dense[..., 16:, :8].any()  # π(2) = 0: query block 2 never reads block 0
    assert np.abs(np.asarray(sampled) - exact).max() > 1e-3


def test_bad_input():
    q, k, v = normal(2, (1, 8, 2, H), (1, 8, 1, H), (1, 8, 1, V))
    with pytest.raises(ValueError, match=r"slopes must have shape \[N=2\]"):
        rope_alibi_attention(q, k, v, rope=None, slopes=np.ones(3))
    with pytest.raises(ValueError, match="positions_BT must have shape"):
        rope_alibi_attention(q, k, v, rope=None, positions_BT=np.zeros((1, 7), np.int32))
    with pytest.raises(ValueError, match="self-attention"):
        rope_alibi_attention(q, k[:, :4], v[:, :4], rope=None)
    with pytest.raises(ValueError, match="series must be one of"):
        alibi_slopes(4, series="linear")
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        alibi_slopes(0)
