"""attn.pattern / attn.scores: exact recomputation from the op's LSE for chosen heads and rows,
against jax.nn.softmax of the explicitly masked logits; edits through the xla path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hooks_testlib import forward, model_of, packed, reference_probs, run, tokens, visible_BTS

import jaxattn
from jaxattn import heads, masks


def _scale(model, layer):
    attn = model.layers[layer].attn
    c = attn.config
    if hasattr(c, "qk_head_dim"):  # mla
        return c.scale
    return c.softmax_scale or 1.0 / np.sqrt(c.h)


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_pattern_equals_softmax_of_masked_logits(kind):
    model = model_of(kind)
    toks, extra = tokens(), packed()
    layer = 1  # mha: the sliding-window layer
    sel_heads, sel_rows = (3, 0), (0, 4, -1)
    hooks = [
        heads.Capture(f"blocks.{layer}.attn.q"),
        heads.Capture(f"blocks.{layer}.attn.k"),
        heads.Capture(f"blocks.{layer}.attn.pattern", heads=sel_heads, positions=sel_rows),
        heads.Capture(f"blocks.{layer}.attn.scores", heads=sel_heads, positions=sel_rows),
    ]
    logits, caps = run(model, toks, hooks, **extra)
    np.testing.assert_allclose(logits, forward(model, toks, **extra), atol=1e-5)
    c = model.config
    window = c.sliding_window if kind == "mha" else None
    vis = visible_BTS(8, window=window, segment_ids_BT=extra["segment_ids_BT"])
    cap = c.logits_soft_cap if kind == "mha" else None
    q, k = caps[f"blocks.{layer}.attn.q"], caps[f"blocks.{layer}.attn.k"]
    s_ref, p_ref = reference_probs(q, k, vis, scale=_scale(model, layer), soft_cap=cap)
    rows = [r % 8 for r in sel_rows]
    p = np.asarray(caps[f"blocks.{layer}.attn.pattern"])
    assert p.shape == (2, 2, 3, 8) and p.dtype == np.float32
    np.testing.assert_allclose(p, p_ref[:, sel_heads][:, :, rows], atol=1e-6)
    s = np.asarray(caps[f"blocks.{layer}.attn.scores"])
    np.testing.assert_allclose(s, s_ref[:, sel_heads][:, :, rows], atol=1e-5)
    assert np.all(np.isneginf(s) == ~vis[:, None, rows])
    # rows sum to 1 over the visible keys, and are 0 elsewhere
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert np.all(p[~np.broadcast_to(vis[:, None, rows], p.shape)] == 0)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_probabilities_from_lse_with_fully_masked_rows(implementation):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 4, 16))
    k = jax.random.normal(kk, (2, 7, 2, 16))
    v = jax.random.normal(kv, (2, 7, 2, 8))
    op = dict(mask=masks.Causal(), q_offset=2, kv_lengths=jnp.array([0, 5]), logits_soft_cap=3.0)

    @jax.jit
    def probs(q, k, v):
        _, lse = jaxattn.dot_product_attention(
            q, k, v, **op, return_lse=True, implementation=implementation
        )
        return heads.probabilities(q, k, lse, heads=[1, 2], rows=range(5), **op)

    p = probs(q, k, v)
    i, j = np.arange(5)[:, None] + 2, np.arange(7)[None, :]
    vis = (j <= i)[None] & (j < np.array([0, 5])[:, None, None])
    _, p_ref = reference_probs(q, k, vis, scale=0.25, soft_cap=3.0)
    np.testing.assert_allclose(p, p_ref[:, [1, 2]], atol=1e-6)
    assert float(jnp.abs(p[0]).max()) == 0.0  # kv_lengths 0: every row sees no key
    np.testing.assert_allclose(p[1].sum(-1), 1.0, atol=1e-6)


def test_pattern_edit_runs_the_op_faithfully_incl_dropout():
    """An identity edit on pattern takes the xla path: same logits as the op, dropout too."""
    model = model_of("mha", attention_dropout=0.3)
    toks, rng = tokens(), jax.random.key(7)
    edit = heads.Intervene("blocks.0.attn.pattern", lambda p, ctx: p)
    want = forward(model, toks, rng=rng)
    got, _ = run(model, toks, [edit], rng=rng)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(want, forward(model_of("mha"), toks), atol=1e-3)  # dropout was on


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_scores_bias_and_pattern_edits(kind):
    model = model_of(kind)
    toks = tokens()
    bias_S = jnp.linspace(-2.0, 2.0, 8)
    caps_names = [heads.Capture(f"blocks.0.attn.{p}") for p in ("q", "k", "v", "z")]
    hooks = [
        heads.Intervene("blocks.0.attn.scores", lambda s, ctx: s + bias_S),
        heads.Capture("blocks.0.attn.pattern"),
        *caps_names,
    ]
    _, caps = run(model, toks, hooks)
    q, k, v = (np.asarray(caps[f"blocks.0.attn.{p}"], np.float64) for p in "qkv")
    cap = model.config.logits_soft_cap if kind == "mha" else None
    s, _ = reference_probs(q, k, visible_BTS(8), scale=_scale(model, 0), soft_cap=cap)
    s = s + np.asarray(bias_S)  # masked keys stay -inf
    p = np.asarray(jax.nn.softmax(jnp.asarray(s, jnp.float32), axis=-1))
    np.testing.assert_allclose(caps["blocks.0.attn.pattern"], p, atol=1e-6)
    g = q.shape[2] // v.shape[2]
    z = np.einsum("bnts,bsnv->btnv", p, np.repeat(v, g, axis=2))
    np.testing.assert_allclose(caps["blocks.0.attn.z"], z, atol=1e-5)
    if kind == "mla":
        return  # head_gate is the identity in both kinds: one check suffices
    # zeroing a head's probabilities == masking its per-head output
    zero_p = heads.mask_heads("blocks.1.attn.pattern", [2])
    zero_z = heads.mask_heads("blocks.1.attn.z", [2])
    a, _ = run(model, toks, [zero_p])
    b, _ = run(model, toks, [zero_z])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a, forward(model, toks), atol=1e-4)
