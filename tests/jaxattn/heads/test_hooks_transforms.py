"""Hooks under transforms: no hook = the same program; captures leave jax.jit, nnx.jit,
remat_blocks, jax.lax.scan, jax.grad and a 2x2x2 mesh; hooks in cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hooks_testlib import model_of, packed, run, tokens

from jaxattn import heads
from jaxattn.layers import Context
from jaxattn.layers._attention import Attention
from jaxattn.layers._kinds import AttentionLayer, dropout_args
from jaxattn.layers._mla import MultiHeadLatentAttention
from jaxattn.masks import Causal
from jaxattn.ops.attention import dot_product_attention
from models import decoder
from train.pretrain import remat_blocks

# -- the flow before the hook mechanism (main at the seams merge), for the jaxpr comparison ----


def _plain_layer_call(self, x_BTD, ctx=None):
    x_BTD = self._check_input(x_BTD)
    b, t, _ = x_BTD.shape
    ctx = Context.create(b, t) if ctx is None else ctx
    q, kv = self.qk_transform(*self.project(x_BTD, ctx), ctx)
    o_BTNV = self.head_gate(self.attend(q, kv, ctx), ctx)
    return self.out(o_BTNV, ctx)


def _plain_mha_attend(self, q_BTNH, kv, ctx):
    c = self.config
    k_BTKH, v_BTKV = kv
    return dot_product_attention(
        q_BTNH,
        k_BTKH,
        v_BTKV,
        mask=c.mask,
        scale=c.softmax_scale,
        logits_soft_cap=c.logits_soft_cap,
        implementation=c.implementation,
        **dropout_args(c.dropout, ctx, 1),
        segment_ids=ctx.segment_ids_BT,
    )


def _plain_mla_attend(self, q, kv, ctx):
    c = self.config
    (q_nope_BTNH, q_pe_BTNP), (c_BTL, k_pe_BT1P) = q, kv
    k_nope_BTNH = self.k_b(c_BTL, ctx)
    v_BTNV = self.v_b(c_BTL, ctx)
    k_pe_BTNP = jnp.broadcast_to(k_pe_BT1P, (*k_nope_BTNH.shape[:3], c.qk_rope_head_dim))
    q_BTNH = jnp.concatenate([q_nope_BTNH, q_pe_BTNP], axis=-1)
    k_BTNH = jnp.concatenate([k_nope_BTNH, k_pe_BTNP], axis=-1)
    return dot_product_attention(
        q_BTNH,
        k_BTNH,
        v_BTNV,
        mask=Causal(),
        scale=c.scale,
        segment_ids=ctx.segment_ids_BT,
        implementation=c.implementation,
        **dropout_args(c.dropout, ctx, 1),
    )


def _plain_block_call(self, x_BTD, ctx):
    ctx = ctx.at_layer(self.layer)
    x_BTD = x_BTD + self._drop(self.attn(self.attn_norm(x_BTD), ctx), ctx, 2)
    return x_BTD + self._drop(self.mlp(self.mlp_norm(x_BTD), ctx), ctx, 3)


def _jaxpr(model, hooks=None, **kw) -> str:
    """The forward's jaxpr (``hooks`` None: the call without the keyword)."""
    graphdef, state = nnx.split(model)
    extra = {} if hooks is None else {"hooks": hooks}
    f = lambda s, t, kw: nnx.merge(graphdef, s)(t, **kw, **extra)  # noqa: E731
    return str(jax.make_jaxpr(f)(state, tokens(), kw))


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_no_hook_forward_is_the_program_without_the_mechanism(kind, remat, monkeypatch):
    model = model_of(kind, attention_dropout=0.1, residual_dropout=0.1)
    model = remat_blocks(nnx.clone(model)) if remat else model
    kw = dict(packed(), rng=jax.random.key(0))
    with_mechanism = _jaxpr(model, **kw)
    assert _jaxpr(model, hooks=heads.HookSet([], heads.hook_names(model)), **kw) == with_mechanism
    hooked = _jaxpr(model, hooks=[heads.Intervene("blocks.0.resid_mid", lambda x, c: -x)], **kw)
    assert hooked != with_mechanism  # the comparison can see a hook
    monkeypatch.setattr(AttentionLayer, "__call__", _plain_layer_call)
    monkeypatch.setattr(Attention, "attend", _plain_mha_attend)
    monkeypatch.setattr(MultiHeadLatentAttention, "attend", _plain_mla_attend)
    monkeypatch.setattr(decoder.Block, "__call__", _plain_block_call)
    monkeypatch.setattr(decoder.heads, "hook_set", lambda model, hooks: ())
    assert _jaxpr(model, **kw) == with_mechanism


def test_captures_leave_jit_remat_scan_grad_and_mesh():
    from jaxattn import sharding

    model = model_of("mla")
    toks = tokens(4, 8)
    hooks = (
        heads.Capture("blocks.0.attn.pattern", heads=[1, 3], positions=[2, -1]),
        heads.Capture("blocks.1.attn.z"),
        heads.Capture("blocks.1.resid_mid"),
        heads.scale_heads("blocks.0.attn.z", jnp.array([1.0, 0.5, 2.0, 0.0])),
    )
    want_logits, want = run(model, toks, hooks)  # jax.jit over the split state

    def same(got_logits, got):
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)

    same(*nnx.jit(lambda m, t: heads.run_with_hooks(m, t, hooks))(model, toks))
    rematted = remat_blocks(nnx.clone(model))
    same(*run(rematted, toks, hooks))

    def body(carry, toks_BT):  # the model closed over, cloned inside the scan body
        return carry, heads.run_with_hooks(rematted, toks_BT, hooks)

    _, (logits_S, caps_S) = jax.jit(lambda x: jax.lax.scan(body, 0, x))(toks.reshape(2, 2, 8))
    same(
        logits_S.reshape(want_logits.shape),
        {n: v.reshape(want[n].shape) for n, v in caps_S.items()},
    )

    explicit = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.sharding.Mesh(explicit.devices, explicit.axis_names, axis_types=auto)
    graphdef, state = nnx.split(model)
    placed = [
        (
            path,
            var.replace(
                jax.device_put(
                    var[...], sharding.logical_sharding(var.get_metadata()["out_sharding"], mesh)
                )
            ),
        )
        for path, var in nnx.to_flat_state(state)
    ]
    with jax.set_mesh(mesh):
        f = jax.jit(lambda s, t: heads.run_with_hooks(nnx.merge(graphdef, s), t, hooks))
        same(*f(nnx.from_flat_state(placed), toks))


def test_gradients_reach_a_learnable_head_scale_under_remat():
    toks = tokens()

    def loss_fn(graphdef):
        def loss(scales_N, state):
            m = nnx.merge(graphdef, state)
            hooks = [
                heads.scale_heads("blocks.0.attn.z", scales_N),
                heads.Capture("blocks.1.attn.z"),
            ]
            logits, caps = heads.run_with_hooks(m, toks, hooks)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(caps["blocks.1.attn.z"])

        return jax.jit(jax.value_and_grad(loss))

    scales = jnp.array([1.0, 0.5, 2.0, 1.5])
    plain = model_of("mha")
    graphdef, state = nnx.split(plain)
    f = loss_fn(graphdef)
    l_plain, g_plain = f(scales, state)
    r_graphdef, r_state = nnx.split(remat_blocks(nnx.clone(plain)))
    l_remat, g_remat = loss_fn(r_graphdef)(scales, r_state)
    np.testing.assert_allclose(l_plain, l_remat, atol=1e-6)
    np.testing.assert_allclose(g_plain, g_remat, atol=1e-6)
    eps = 1e-2
    e2 = jnp.eye(4)[2] * eps
    fd = (f(scales + e2, state)[0] - f(scales - e2, state)[0]) / (2 * eps)
    np.testing.assert_allclose(g_plain[2], fd, rtol=1e-2, atol=1e-5)
    assert float(jnp.abs(g_plain).min()) > 0


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_decode_captures_and_head_masks_match_the_forward(kind):
    model = model_of(kind)
    toks = tokens(2, 8)
    points = ("attn.q", "attn.k", "attn.v", "attn.z", "resid_post")
    hooks = (
        heads.mask_heads("blocks.0.attn.z", [1]),
        *(heads.Capture(f"blocks.1.{p}") for p in points),
    )
    want_logits, want = run(model, toks, hooks)
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, toks):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(2, 16, jnp.float32)
        logits0, cache, caps0 = heads.decode_with_hooks(m, toks[:, :5], cache, hooks)

        def step(cache, tok_B):
            logits, cache, caps = heads.decode_with_hooks(m, tok_B[:, None], cache, hooks)
            return cache, (logits[:, 0], caps)

        _, (logits_SBV, caps_S) = jax.lax.scan(step, cache, toks[:, 5:].T)
        return logits0, logits_SBV, caps0, caps_S

    logits0, logits_SBV, caps0, caps_S = decode(state, toks)
    np.testing.assert_allclose(logits0, want_logits[:, :5], atol=1e-5)
    np.testing.assert_allclose(jnp.swapaxes(logits_SBV, 0, 1), want_logits[:, 5:], atol=1e-5)
    for name in want:
        np.testing.assert_allclose(caps0[name], want[name][:, :5], atol=1e-5, err_msg=name)
        steps = jnp.swapaxes(caps_S[name][:, :, 0], 0, 1)  # [S, B, 1, ...] -> [B, S, ...]
        np.testing.assert_allclose(steps, want[name][:, 5:], atol=1e-5, err_msg=name)


def test_decode_refuses_pattern_and_qkv_edits():
    model = model_of("mha")
    cache = model.init_cache(2, 16, jnp.float32)
    toks = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    for hook, match in (
        (heads.Capture("blocks.0.attn.pattern", positions=0), "returns no probabilities"),
        (heads.Intervene("blocks.1.attn.k", lambda k, ctx: k), "intervene on attn.z"),
    ):
        with pytest.raises(NotImplementedError, match=match):
            jax.eval_shape(
                lambda t, c, h=hook: heads.decode_with_hooks(model, t, c, [h]), toks, cache
            )
