"""BlockRank (jaxattn.ops.blockrank): the structured mask (no cross-document attention, the
query sees every block), the op under it equals jax.nn with the explicit mask (fwd+bwd), the
per-document attention mass and the contrastive loss."""

import jax
import jax.numpy as jnp
import numpy as np
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn.ops import blockrank

# instruction (3) | doc 1 (5) | doc 2 (4) | doc 3 (6) | query (4)
DOCS = np.array([0] * 3 + [1] * 5 + [2] * 4 + [3] * 6 + [-1] * 4)


def test_mask_structure():
    m = np.asarray(blockrank.blockrank_mask(DOCS[None]))[0]
    T = len(DOCS)
    for i in range(T):
        for j in range(T):
            di, dj = DOCS[i], DOCS[j]
            want = j <= i and (di == dj or dj == 0 or di == -1)
            assert m[i, j] == want, (i, j)
    assert m[-1].all()  # the last query token sees every block
    assert not m[DOCS == 2][:, DOCS == 1].any()  # no cross-document attention


def test_attention_equals_dense_reference_and_mass_and_loss():
    T, N, K, H = len(DOCS), 4, 2, 8
    q, k, v, do = normal(0, (2, T, N, H), (2, T, K, H), (2, T, K, H), (2, T, N, H))
    docs = jnp.asarray(np.stack([DOCS, DOCS]))
    mask = np.asarray(jax.jit(blockrank.blockrank_mask)(docs))[:, None]

    def both(q, k, v, do, docs, mask):  # the op and the masked reference, one compiled call
        vg = lambda f: jax.value_and_grad(  # noqa: E731
            lambda *a: jnp.sum(f(*a) * do), argnums=(0, 1, 2)
        )(q, k, v)
        _, lse = blockrank.blockrank_attention(q, k, v, docs, return_lse=True)
        return (
            vg(lambda q, k, v: blockrank.blockrank_attention(q, k, v, docs)),
            vg(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)),
            blockrank.document_attention(q, k, lse, docs, 3),  # [B, N, T, 3]
        )

    got, want, mass = fast_jit(both)(q, k, v, do, docs, mask)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    mass = np.asarray(mass)
    qn, kn = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
    s = np.where(mask, np.einsum("btnh,bsnh->bnts", qn, kn) / np.sqrt(H), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)  # numpy softmax: no eager compiles
    for d in (1, 2, 3):
        np.testing.assert_allclose(mass[..., d - 1], p[..., DOCS == d].sum(-1), atol=1e-5)
    # a document token puts no mass on other documents; the query's masses are positive
    assert np.abs(mass[:, :, DOCS == 2][..., [0, 2]]).max() == 0.0
    assert (mass[:, :, -1] > 0).all()
    m = np.array([[0.5, 0.2, 0.1]], np.float32)
    z = m[0] / 0.1
    want_loss = -(z[0] - z.max() - np.log(np.exp(z - z.max()).sum()))
    loss = jax.jit(lambda m, y: blockrank.contrastive_loss(m, y, temperature=0.1))
    np.testing.assert_allclose(loss(m, np.array([0])), want_loss, rtol=1e-6)


def test_bad_temperature_is_named():
    import pytest

    with pytest.raises(ValueError, match="temperature must be > 0"):
        blockrank.contrastive_loss(jnp.zeros((1, 2)), jnp.array([0]), temperature=0.0)
