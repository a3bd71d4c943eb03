"""ADDER (Adapted Dense Retrieval): a new adapter is the identity; Tr(e) = e + softmax(e·Kᵀ)·V
(and e + e·A·B) against numpy; the residual over N > h embeddings has rank <= h; only the
adapter leaves get gradients, and a few Adam steps on a distorted toy task lower the
global-negatives contrastive loss and raise top-1 precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn.layers import AdapterParam
from jaxattn.lowrank import adapted_retrieval as adr

D, H = 8, 3


def _set(ad, seed=1):
    for name in ("values", "up"):
        if hasattr(ad, name):
            p = getattr(ad, name)
            p[...] = jnp.asarray(np.random.default_rng(seed).standard_normal(p.shape, np.float32))


@pytest.mark.parametrize("kind", adr.RESIDUALS)
def test_identity_at_init_equation_and_rank(kind):
    ad = adr.ResidualAdapter(adr.AdderConfig(dim=D, rank=H, residual=kind), rngs=nnx.Rngs(0))
    e = jnp.asarray(np.random.default_rng(2).standard_normal((12, D), np.float32))
    np.testing.assert_array_equal(np.asarray(ad(e)), np.asarray(e))
    _set(ad)
    en = np.asarray(e, np.float64)
    if kind == "kv":
        z = en @ np.asarray(ad.keys[...], np.float64).T
        w = np.exp(z - z.max(-1, keepdims=True))
        res = (w / w.sum(-1, keepdims=True)) @ np.asarray(ad.values[...], np.float64)
    else:
        res = en @ np.asarray(ad.down[...], np.float64) @ np.asarray(ad.up[...], np.float64)
    np.testing.assert_allclose(np.asarray(ad(e)), en + res, rtol=1e-5, atol=1e-5)
    assert np.linalg.matrix_rank(np.asarray(ad.residual(e), np.float64), tol=1e-5) == H


def test_only_adapter_trains_and_retrieval_improves():
    rng = np.random.default_rng(0)  # numpy draws and a jitted init: no per-op compiles
    corpus = rng.standard_normal((24, D), np.float32)
    target = np.arange(24) % 24
    mix = np.eye(D, dtype=np.float32) + 0.9 * rng.standard_normal((D, D), np.float32) / np.sqrt(D)
    queries = corpus[target] @ mix + 0.05 * rng.standard_normal((24, D), np.float32)
    corpus, queries = jnp.asarray(corpus), jnp.asarray(queries)
    cfg = adr.AdderConfig(dim=D, rank=8, adapt="both", temperature=0.1)
    model = nnx.jit(lambda: adr.AdaptedRetriever(cfg, rngs=nnx.Rngs(0)))()
    graphdef, params, rest = nnx.split(model, AdapterParam, ...)
    paths = sorted("/".join(map(str, k)) for k, _ in nnx.to_flat_state(params))
    assert paths == ["corpus/keys", "corpus/values", "query/keys", "query/values"]
    n_param = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_param == 4  # every parameter of the retriever is an adapter leaf
    tx = optax.adam(3e-2)

    @jax.jit
    def loss(p, q, c):
        return adr.contrastive_loss(nnx.merge(graphdef, p, rest), q, c, target)

    @jax.jit
    def step(p, s):
        val, g = jax.value_and_grad(loss)(p, queries, corpus)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s, val

    p, s = params, tx.init(params)
    first = float(loss(params, queries, corpus))
    for _ in range(40):
        p, s, val = step(p, s)
    trained = nnx.merge(graphdef, p, rest)
    base = nnx.merge(graphdef, params, rest)
    top1 = nnx.jit(lambda m: adr.top_k(m, queries, corpus, 1)[:, 0])
    hit = lambda m: float(np.mean(np.asarray(top1(m)) == target))  # noqa: E731
    last = float(loss(p, queries, corpus))
    print(f"loss {first:.3f} -> {last:.3f}, top-1 {hit(base):.3f} -> {hit(trained):.3f}")
    assert last < 0.7 * first
    assert hit(trained) > hit(base)


def test_validation():
    for bad, field in [
        (dict(dim=0), "dim"),
        (dict(dim=4, rank=0), "rank"),
        (dict(dim=4, residual="mlp"), "residual"),
        (dict(dim=4, adapt="corpus"), "adapt"),
        (dict(dim=4, temperature=0.0), "temperature"),
    ]:
        with pytest.raises(ValueError, match=field):
            adr.AdderConfig(**bad)
    ad = adr.ResidualAdapter(adr.AdderConfig(dim=D, rank=H), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dim"):
        ad(jnp.ones((2, D + 1)))
