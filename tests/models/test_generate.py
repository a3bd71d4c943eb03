"""jaxattn.generate on a DecoderLM: greedy == argmax of the full forward, stops, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.generate import generate, sample_logits
from models import DecoderLM, get_config


@pytest.fixture(scope="module")
def model():
    return DecoderLM(get_config("deepseek-tiny", num_layers=1), rngs=nnx.Rngs(0))


PROMPT = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32)
LENS = np.array([4, 2])


def test_greedy_matches_full_forward_argmax(model):
    out = generate(model, PROMPT, LENS, max_new_tokens=5, rng=jax.random.key(0))
    assert out.tokens_BS.shape == (2, 9) and out.lengths_B.tolist() == [9, 7]
    fwd = nnx.jit(lambda m, t: m(t))
    for b in range(2):
        seq = np.asarray(out.tokens_BS[b, : int(out.lengths_B[b])])
        logits = np.asarray(fwd(model, jnp.asarray(seq[None, :-1])))[0]
        np.testing.assert_array_equal(seq[LENS[b] :], logits[LENS[b] - 1 :].argmax(-1))
    assert not np.asarray(out.tokens_BS[1, 7:]).any()


def test_stop_tokens_end_each_sequence(model):
    free = generate(model, PROMPT, LENS, max_new_tokens=5, rng=jax.random.key(0))
    stop = int(free.tokens_BS[0, 5])  # sequence 0's second generated token
    out = generate(
        model, PROMPT, LENS, max_new_tokens=5, rng=jax.random.key(0), stop_tokens=(stop,)
    )
    assert int(out.lengths_B[0]) == 6 and int(out.tokens_BS[0, 5]) == stop
    assert not np.asarray(out.tokens_BS[0, 6:]).any()


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    kw = dict(max_new_tokens=4, temperature=0.8, top_p=0.9)
    a = generate(model, PROMPT, LENS, rng=jax.random.key(1), **kw)
    b = generate(model, PROMPT, LENS, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a.tokens_BS, b.tokens_BS)
    greedy = generate(model, PROMPT, LENS, max_new_tokens=4, rng=jax.random.key(0))
    top1 = generate(
        model, PROMPT, LENS, max_new_tokens=4, rng=jax.random.key(3), temperature=1.0, top_k=1
    )
    np.testing.assert_array_equal(greedy.tokens_BS, top1.tokens_BS)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_p=0.7)[0])(keys)
    assert set(np.asarray(draw).tolist()) == {0, 1}
    draw = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_k=3)[0])(keys)
    assert set(np.asarray(draw).tolist()) == {0, 1, 2}


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPT, LENS, max_new_tokens=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_lengths_B"):
        generate(model, PROMPT, LENS[:1], max_new_tokens=2, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_lengths_B"):
        generate(model, PROMPT, np.array([0, 5]), max_new_tokens=2, rng=jax.random.key(0))
