"""QK-score / attention score (by hand from captured q, k), ICR (two forward passes; hand-set
maps), AttentionInfluence (zero heads -> 0; = loss difference), LargePiG (the formula; sums
to 1) on tiny random models (PAPERS.md §10 faithful tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hooks_testlib import forward, model_of, run, tokens

from jaxattn import heads
from jaxattn.heads import maps, methods


def _jit(model, fn):
    """``fn(model, *args)`` under ``jax.jit`` with the model's arrays as arguments."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    return lambda *a: f(state, *a)


PATTERNS = (heads.Capture("blocks.*.attn.pattern"),)


@pytest.fixture(scope="module")
def model():
    return model_of("mha")  # GQA G = 2, soft cap 5, a window on layer 1


def test_qk_score_is_scaled_q_dot_k_by_hand(model):
    toks = tokens(2, 8)
    t_q = 7
    opts = jnp.array([[1, 3, 5], [0, 2, 6]])
    qk, attn = _jit(model, lambda m, t, o: methods.option_scores(m, t, t_q, o))(toks, opts)
    _, caps = run(model, toks, (heads.Capture("blocks.0.attn.q"), heads.Capture("blocks.0.attn.k")))
    q, k = np.asarray(caps["blocks.0.attn.q"], np.float64), np.asarray(caps["blocks.0.attn.k"])
    H, G = q.shape[-1], q.shape[2] // k.shape[2]
    for b in range(2):
        for n in range(q.shape[2]):
            for j, s in enumerate(np.asarray(opts[b])):
                want = 5.0 * np.tanh(q[b, t_q, n] @ k[b, s, n // G] / np.sqrt(H) / 5.0)
                np.testing.assert_allclose(float(qk[0, n, b, j]), want, rtol=1e-5, atol=1e-6)
    _, pc = run(model, toks, PATTERNS)
    p = np.asarray(pc["blocks.0.attn.pattern"])
    np.testing.assert_allclose(
        np.asarray(attn[0]), np.stack([p[b, :, t_q, np.asarray(opts[b])].T for b in range(2)], 1),
        rtol=1e-6,
    )  # fmt: skip
    picked, acc = methods.select_heads(np.asarray(qk), np.array([0, 2]), k=2)
    assert picked == methods.select_heads(np.asarray(qk), np.array([0, 2]), k=2)[0]
    assert acc.shape == (2, 4) and picked[0] == tuple(np.unravel_index(np.argmax(acc), acc.shape))


def test_icr_two_passes_and_hand_computed_ranking(model, monkeypatch):
    toks = tokens(1, 10)
    cf = toks.at[:, 8:].set(0)
    docs = np.zeros((1, 3, 10), bool)
    docs[0, 0, 0:3], docs[0, 1, 3:6], docs[0, 2, 6:8] = True, True, True
    calls = []
    real = heads.run_with_hooks

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(methods, "run_with_hooks", counting)
    icr = _jit(model, lambda m, t, c, d: methods.icr_scores(m, t, c, (8, 9), d))
    score = icr(toks, cf, docs)
    assert len(calls) == 2  # traced once: two forward passes in the program
    monkeypatch.undo()

    def mass(t):
        _, caps = run(model, t, PATTERNS)
        return sum(np.asarray(maps.segment_mass(caps[f"blocks.{i}.attn.pattern"][:, :, 8:], docs))
                   .sum((1, 2)) for i in range(2))  # fmt: skip

    want = mass(toks) - mass(cf)
    np.testing.assert_allclose(np.asarray(score), want, rtol=1e-5, atol=1e-6)
    # hand-set maps: the ranking of the mass differences
    p_q = np.zeros((1, 1, 1, 8))
    p_q[..., [1, 4, 6]] = [0.2, 0.5, 0.3]
    p_cf = np.zeros((1, 1, 1, 8))
    p_cf[..., [1, 4, 6]] = [0.1, 0.6, 0.3]
    d = np.zeros((1, 3, 8), bool)
    d[0, 0, :3], d[0, 1, 3:5], d[0, 2, 5:] = True, True, True
    diff = maps.segment_mass(p_q, d) - maps.segment_mass(p_cf, d)
    np.testing.assert_allclose(np.asarray(diff)[0, 0, 0], [0.1, -0.1, 0.0], atol=1e-7)


def test_attention_influence(model):
    toks = tokens(3, 8)
    tgt, w = jnp.roll(toks, -1, 1), jnp.ones(toks.shape)
    np.testing.assert_array_equal(
        np.asarray(methods.attention_influence(model, toks, tgt, w, [])), 0.0
    )
    heads_ = [(0, 1), (1, 2)]
    got = methods.attention_influence(model, toks, tgt, w, heads_)

    def loss(logits):
        lp = jax.nn.log_softmax(logits, -1)
        return -np.asarray(jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]).mean(-1)

    hooks = [heads.mask_heads("blocks.0.attn.z", 1), heads.mask_heads("blocks.1.attn.z", 2)]
    masked, _ = run(model, toks, hooks)
    np.testing.assert_allclose(
        np.asarray(got), loss(masked) - loss(forward(model, toks)), rtol=1e-5, atol=1e-6
    )


def test_largepig_formula_and_normalisation(model):
    toks = tokens(2, 8)
    out = methods.largepig(model, toks, high_layer=0)
    p = np.asarray(out["p"])
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["copy"]).sum(-1), 1.0, rtol=1e-5)
    pc = np.asarray(out["p_copy"])[:, None]
    np.testing.assert_allclose(p, pc * out["copy"] + (1 - pc) * out["p_vocab"], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out["p_vocab"]), jax.nn.softmax(model(toks)[:, -1]), rtol=1e-5
    )
    assert ((0 <= pc) & (pc <= 1)).all()
    # the pointer distribution sits on the input ids only
    for b in range(2):
        off = np.setdiff1d(np.arange(256), np.asarray(toks[b]))
        assert (np.asarray(out["copy"])[b, off] == 0).all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: methods.largepig(m, tokens(1, 4), high_layer=1), "high_layer=1"),
        (lambda m: methods.option_scores(m, tokens(1, 4), 2, jnp.array([[3]])), "option positions"),
        (
            lambda m: methods.icr_scores(
                m, tokens(1, 4), tokens(1, 5), (3,), np.zeros((1, 1, 4), bool)
            ),
            "content_free_BT",
        ),
        (lambda m: methods.select_heads(np.zeros((2, 4, 3, 2)), np.zeros(2)), "labels_B"),
    ],
)
def test_bad_input(model, call, match):
    with pytest.raises(ValueError, match=match):
        call(model)
