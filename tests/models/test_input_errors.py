"""Bad input fails early with a message that names the argument (issue 12 items 4, 7, 8)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.generate import generate
from jaxattn.layers import Attention, AttentionConfig, MLAConfig, RMSNorm, SwiGLU
from models import DecoderLM, from_hf, get_config, to_hf


@pytest.fixture(scope="module")
def model():
    return DecoderLM(get_config("llama-tiny"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("ids", [[[999, 1, 2, 3]], [[1, -1, 2, 3]], [[256, 0, 0, 0]]])
def test_out_of_vocabulary_ids_are_an_error(model, ids):
    with pytest.raises(ValueError, match=r"token ids \[-?\d+\] are outside the vocabulary"):
        model(jnp.array(ids))
    cache = model.init_cache(1, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.decode(jnp.array(ids), cache)
    with pytest.raises(ValueError, match="prompt token ids"):
        generate(model, jnp.array(ids), jnp.array([4]), max_new_tokens=2, rng=jax.random.key(0))


def test_out_of_vocabulary_ids_under_jit_give_nan_not_a_wrapped_token(model):
    # documented: traced ids cannot be checked; an out-of-range id makes its own and every later
    # position of its row NaN, and changes nothing before it or in other rows
    tokens = jnp.array([[5, 999, 7], [5, -3, 7], [5, 6, 7]])
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    assert np.isnan(logits[:2, 1:]).all()
    ok = np.asarray(model(jnp.array([[5, 6, 7]])))
    np.testing.assert_allclose(logits[2], ok[0], atol=1e-5)
    np.testing.assert_allclose(logits[:2, 0], ok[:, 0].repeat(2, 0), atol=1e-5)


def test_padding_beyond_prompt_lengths_is_not_checked(model):
    prompt = jnp.array([[1, 2, 999]])  # the third slot is padding (length 2)
    out = generate(model, prompt, jnp.array([2]), max_new_tokens=1, rng=jax.random.key(0))
    assert int(out.lengths_B[0]) == 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AttentionConfig(d_model=8, num_heads=4.0), "num_heads=4.0 must be an int"),
        (lambda: AttentionConfig(d_model=8, num_heads="4"), "num_heads='4' must be an int"),
        (lambda: AttentionConfig(d_model=8, num_heads=2, dtype="fp16"), "dtype='fp16' is not"),
        (lambda: AttentionConfig(d_model=8, num_heads=2, norm_eps=-1), "norm_eps=-1 must be > 0"),
        (lambda: AttentionConfig(d_model=8, num_heads=2, logits_soft_cap=0.0), "soft_cap=0.0"),
        (
            lambda: AttentionConfig(d_model=8, num_heads=2, implementation="flash"),
            "implementation='flash' must be one of",
        ),
        (lambda: AttentionConfig(d_model=8, num_heads=2, dropout=1.0), r"dropout=1.0 .*\[0, 1\)"),
        (lambda: RMSNorm(0, rngs=nnx.Rngs(0)), "RMSNorm.dim=0 must be >= 1"),
        (lambda: RMSNorm(4, eps=0.0, rngs=nnx.Rngs(0)), "RMSNorm.eps=0.0 must be > 0"),
        (lambda: SwiGLU(4, 0, rngs=nnx.Rngs(0)), "hidden_dim=0"),
        (
            lambda: MLAConfig(
                d_model=8,
                num_heads=2,
                kv_lora_rank=4,
                qk_nope_head_dim=4,
                qk_rope_head_dim=2,
                v_head_dim=4,
                implementation="flash",
            ),
            "implementation='flash'",
        ),
        (lambda: get_config("llama-tiny", implementation="flash"), "implementation='flash'"),
        (lambda: get_config("llama-tiny", norm_eps=-1.0), "norm_eps=-1.0 must be > 0"),
        (lambda: get_config("llama-tiny", num_heads=4.0), "num_heads=4.0 must be an int"),
        (lambda: get_config("llama-tiny", dtype="fp16"), "dtype='fp16' is not a dtype"),
        (lambda: get_config("llama-tiny", residual_dropout=-0.1), "residual_dropout"),
        (lambda: get_config("llama-tiny", attention_impl="xla"), "renamed.*implementation"),
    ],
)
def test_configs_reject_bad_values_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_attention_input_rank_is_checked():
    layer = Attention(AttentionConfig(d_model=8, num_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"input must be \[batch, length, d_model=8\].*\(5, 8\)"):
        layer(jnp.zeros((5, 8)))
    cache = layer.init_cache(3, 4)
    with pytest.raises(ValueError, match="cache holds 3 sequences but the input has batch 2"):
        layer.decode(jnp.zeros((2, 1, 8)), cache)


def test_top_k_beyond_the_vocabulary_is_an_error(model):
    with pytest.raises(ValueError, match="top_k=1000 must be <= the vocabulary size 256"):
        generate(
            model,
            jnp.array([[1, 2]]),
            jnp.array([2]),
            max_new_tokens=1,
            rng=jax.random.key(0),
            temperature=1.0,
            top_k=1000,
        )


def test_from_hf_names_the_file_and_the_field(tmp_path, model):
    to_hf(model, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: config.json has no 'hidden_size' field"):
        from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        from_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(str(tmp_path / "nowhere"))


def test_from_hf_detects_a_corrupted_export(tmp_path, model):
    to_hf(model, str(tmp_path))
    np.testing.assert_array_equal(from_hf(str(tmp_path)).embed.table[...], model.embed.table[...])
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4000:-2000] = bytes(2000)  # zero 2000 bytes inside the last tensors' data
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor '.*' in .*model.safetensors does not match"):
        from_hf(str(tmp_path))
