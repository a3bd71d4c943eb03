"""PEAR (PAPERS.md §10 faithful test): coefficients = 1 give the base model; folding the
coefficients into W_O equals explicit scaling of attn.z (RoPE GQA, MLA, and a model with
no position signal); the
coefficients are the only trainable parameters; detection is reproducible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hooks_testlib import model_of, tokens

from jaxattn import heads
from jaxattn.heads import pear

CASES = {
    "rope": lambda: model_of("mha"),
    "mla": lambda: model_of("mla"),
}


@pytest.fixture(scope="module")
def toks():
    return tokens(2, 8)


@pytest.mark.parametrize("case", sorted(CASES))
def test_unit_coefficients_are_the_base_and_fold_is_exact(case, toks):
    model = CASES[case]()
    L, N = len(model.layers), model.config.num_heads
    base = model(toks)
    ones, _ = heads.run_with_hooks(model, toks, pear.coefficient_hooks(jnp.ones((L, N))))
    np.testing.assert_array_equal(np.asarray(ones), np.asarray(base))
    c = jax.random.uniform(jax.random.key(0), (L, N), minval=0.2, maxval=1.5)
    scaled, _ = heads.run_with_hooks(model, toks, pear.coefficient_hooks(c))
    folded = pear.fold_coefficients(model, c)(toks)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(scaled), atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(scaled) - np.asarray(base)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(model(toks)), np.asarray(base))  # model unchanged


def test_position_free_model_folds_exactly(toks):
    # every position 0: RoPE is the identity, so the model has no position signal at all
    model = model_of("mha")
    L, N = len(model.layers), model.config.num_heads
    pos = jnp.zeros_like(toks)
    c = jnp.linspace(0.3, 1.2, L * N).reshape(L, N)
    scaled, _ = heads.run_with_hooks(model, toks, pear.coefficient_hooks(c), positions_BT=pos)
    folded = pear.fold_coefficients(model, c)(toks, positions_BT=pos)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(scaled), atol=2e-5, rtol=1e-5)


def _proxy_loss(model, toks):
    """Next-token cross-entropy of the frozen model under hooks (a copying proxy on random
    rows repeated twice: the second half can be copied from the first)."""
    seq = jnp.concatenate([toks, toks], axis=1)
    graphdef, state = nnx.split(model)
    state = jax.lax.stop_gradient(state)

    def loss(hooks):
        logits, _ = heads.run_with_hooks(nnx.merge(graphdef, state), seq[:, :-1], hooks)
        half = toks.shape[1]
        lp = jax.nn.log_softmax(logits[:, half - 1 :].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(lp, seq[:, half:, None], -1))

    return loss


def test_only_coefficients_train_and_detection_is_reproducible(toks):
    model = model_of("mha")
    L, N = len(model.layers), model.config.num_heads
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    loss = _proxy_loss(model, toks)
    s1 = pear.suppression_scores(loss, L, N)
    s2 = pear.suppression_scores(loss, L, N)
    np.testing.assert_array_equal(s1, s2)
    chosen = [(1, 0), (1, 3)]
    coeffs, losses = pear.train_coefficients(loss, chosen, L, N, steps=20, learning_rate=0.05)
    assert losses[-1] < losses[0]
    free = np.ones((L, N), bool)
    free[tuple(zip(*chosen, strict=True))] = False
    np.testing.assert_array_equal(np.asarray(coeffs)[free], 1.0)  # unchosen heads stay at 1
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # the model is frozen
    # the trained coefficients folded give the trained loss
    folded = pear.fold_coefficients(model, coeffs)
    np.testing.assert_allclose(float(_proxy_loss(folded, toks)(())), losses[-1], rtol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: pear.fold_coefficients(m, jnp.ones((3, 4))), "3 rows for 2 layers"),
        (lambda m: pear.fold_coefficients(m, jnp.ones((2, 5))), "5 heads; layer 0 has 4"),
        (lambda m: pear.coefficient_hooks(jnp.ones(4)), "layers, heads"),
        (lambda m: pear.train_coefficients(lambda h: 0.0, [(2, 0)], 2, 4), "out of range"),
        (lambda m: pear.train_coefficients(lambda h: 0.0, [], 2, 4), "empty"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(model_of("mha"))
