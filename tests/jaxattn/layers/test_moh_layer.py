"""The "moh" kind (Mixture-of-Head attention, PAPERS.md §1 "MoH"): faithful tests.

* all heads active with gates exactly 1 (zero router, top_k = every routed head) == the "mha"
  kind with the same parameters, bitwise;
* heads outside a token's top-k contribute exactly zero (their value projection changed,
  the output is not); the top-k count is respected for every token; the gates follow the
  paper's two-stage definition (α · S · softmax shared, α · k · renormalised top-k routed);
* the load-balance loss is sown per forward (not in cache steps) and equals E² · mean(P · f);
* DecoderLM (``moh-tiny``): prefill + N decode steps == the full forward; HF export refuses;
* bad input names the field and the layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testlib import decode_all  # tests/: prefill then one token per step
from flax import nnx

from jaxattn.generate import generate
from jaxattn.layers import AttentionConfig, MoHConfig
from jaxattn.layers._aux import pop_aux_loss
from jaxattn.layers._context import Context
from jaxattn.layers._moh import moh_gates
from models import DecoderLM, LayerSpec, get_config, to_hf

D = 32


def _x(b=2, t=6, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


def _moh(**kw):
    c = MoHConfig(d_model=D, num_heads=8, num_kv_heads=4, implementation="xla", **kw)
    return c, c.build(rngs=nnx.Rngs(0))


def test_all_heads_with_gates_one_equal_mha_exactly():
    c, moh = _moh(num_shared_heads=4, top_k=4)  # 2 gate stages, all 4 routed heads on
    for lin in (moh.router, moh.shared_router, moh.mix_router):  # uniform softmaxes: gates 1
        lin.kernel.set_value(jnp.zeros_like(lin.kernel[...]))
    mha = AttentionConfig(d_model=D, num_heads=8, num_kv_heads=4, implementation="xla").build(
        rngs=nnx.Rngs(0)
    )  # same init stream: q/k/v/o are drawn before the routers
    for name in ("q", "k", "v", "o"):
        np.testing.assert_array_equal(
            getattr(moh, name).kernel[...], getattr(mha, name).kernel[...]
        )
    x = _x()
    g, mask, _ = moh.gates(x, Context.create(2, 6))
    np.testing.assert_array_equal(g, np.ones((2, 6, 8)))
    np.testing.assert_array_equal(moh(x), mha(x))


def test_gates_follow_the_two_stage_definition_and_top_k():
    rng = np.random.default_rng(1)
    lr, ls, lm = (jnp.asarray(rng.normal(size=(3, 5, n)), jnp.float32) for n in (6, 2, 2))
    g, mask, lb = moh_gates(lr, ls, lm, top_k=3)
    np.testing.assert_array_equal(mask.sum(-1), np.full((3, 5), 3.0))  # k per token
    a = jax.nn.softmax(lm, -1) * 2
    np.testing.assert_allclose(g[..., :2], a[..., :1] * jax.nn.softmax(ls, -1) * 2, rtol=1e-6)
    # routed: softmax over the k selected logits, times k; exactly 0 elsewhere
    sel = np.where(mask > 0, np.asarray(lr), -np.inf)
    ref = a[..., 1:] * jax.nn.softmax(sel, -1) * 3
    np.testing.assert_allclose(g[..., 2:], ref, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g[..., 2:])[np.asarray(mask) == 0] == 0)
    # the top-k are the k largest logits
    kth = np.sort(np.asarray(lr), -1)[..., -3]
    np.testing.assert_array_equal(mask, (np.asarray(lr) >= kth[..., None]).astype(np.float32))
    p = jax.nn.softmax(lr, -1).reshape(-1, 6)
    ref_lb = 36 * np.mean(p.mean(0) * np.asarray(mask).reshape(-1, 6).mean(0))
    np.testing.assert_allclose(lb, ref_lb, rtol=1e-6)


def test_inactive_heads_contribute_exactly_zero_and_lb_is_sown():
    c, moh = _moh(num_shared_heads=0, top_k=2)  # 8 routed heads, kv groups of 2
    x = _x(1, 5, seed=3)
    ctx = Context.create(1, 5)
    out = moh(x)
    lb = pop_aux_loss(moh)
    np.testing.assert_allclose(lb, moh.gates(x, ctx)[2], rtol=1e-6)
    _, mask, _ = moh.gates(x, ctx)
    # a query head's zeroed q makes its attention uniform, changing o_n: invisible iff inactive
    for n in range(8):
        q = moh.q.kernel[...]
        moh.q.kernel.set_value(q.at[:, n].set(0.0))
        changed = np.abs(np.asarray(moh(x) - out)).max(-1)[0]  # [T]
        moh.q.kernel.set_value(q)
        active = np.asarray(mask)[0, :, n] > 0
        assert np.all(changed[~active] == 0.0), (n, changed)
    pop_aux_loss(moh)
    assert pop_aux_loss(moh) is None


@pytest.fixture(scope="module")
def model():
    return DecoderLM(get_config("moh-tiny", implementation="xla"), rngs=nnx.Rngs(0))


def test_decoder_prefill_and_steps_equal_forward(model):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 9)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)

    np.testing.assert_allclose(decode_all(model, tokens), full, atol=2e-5, rtol=2e-5)
    assert model.config.layer_attention_config(0).active_head_fraction == 5 / 8


def test_greedy_generate_equals_argmax_of_full_forwards(model):
    # cache steps sow no load-balance loss (ctx.decoding): generate's while_loop runs MoH
    prompt = jnp.asarray(np.random.default_rng(5).integers(0, 256, (1, 5)), jnp.int32)
    out = generate(model, prompt, jnp.asarray([5]), max_new_tokens=3, rng=jax.random.key(0))
    seq = jnp.zeros((1, 8), jnp.int32).at[0, :5].set(prompt[0])
    forward = nnx.jit(lambda m, t: m(t))
    for i in range(5, 8):
        seq = seq.at[0, i].set(jnp.argmax(forward(model, seq)[0, i - 1]).astype(jnp.int32))
    np.testing.assert_array_equal(out.tokens_BS[0, :8], seq[0])
    assert pop_aux_loss(model) is not None  # the full forwards sowed theirs


def test_hf_export_refuses(model, tmp_path):
    with pytest.raises(ValueError, match="'moh'.*no Hugging Face equivalent"):
        to_hf(model, str(tmp_path))


def test_bad_input_names_field_and_layer():
    with pytest.raises(
        ValueError, match=r"layer 1 \('moh'\).*top_k=7 must be in \[1, routed heads=6\]"
    ):
        get_config("moh-tiny", layer_pattern=None, layer_specs=(
            LayerSpec.of("moh"), LayerSpec.of("moh", num_shared_heads=2, top_k=7)))  # fmt: skip
    with pytest.raises(ValueError, match=r"num_shared_heads=8 must be in \[0, query heads=8\)"):
        MoHConfig(d_model=D, num_heads=8, num_shared_heads=8)
    with pytest.raises(ValueError, match="top_k=0"):
        MoHConfig(d_model=D, num_heads=8, top_k=0)
