"""DyLoRA (PAPERS.md §7): nested ranks by mask, zero gradient past b, b = r_max is LoRA,
any truncation merges; one b per step for every layer; end-to-end on a DecoderLM under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam, Context, Linear
from jaxattn.lowrank.methods.dylora import DyLoRAConfig, sample_rank
from models import DecoderLM, get_config

R = 5
RNG = np.random.default_rng  # numpy draws: no per-shape device compiles


@nnx.jit(static_argnums=0)
def _model(n=1):
    """n projections, initialised in one compiled program (eagerly, every op compiles)."""
    return nnx.List([Linear((6,), (2, 4), axes=("embed", "heads", "head_dim"),
                            rngs=nnx.Rngs(i)) for i in range(n)])  # fmt: skip


def _attach(model, cfg):
    lr.attach(model, ".*", lambda p, lin: cfg.build(p, lin, rngs=nnx.Rngs(0)))
    for lin in model:
        lin.adapter.b[...] = jnp.asarray(RNG(9).standard_normal(lin.adapter.b.shape, np.float32))
    return model


@pytest.mark.parametrize("rank", [1, 3])
def test_components_past_b_get_zero_gradient(rank):
    model = _attach(_model(), DyLoRAConfig(rank=R))
    x = RNG(0).standard_normal((3, 6), np.float32)

    def loss(m):
        return jnp.sum(m[0].adapter.delta_at(x, rank) ** 2)

    grad = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam)))
    g = nnx.to_pure_dict(grad(model))[0]
    ga, gb = np.asarray(g["adapter"]["a"]), np.asarray(g["adapter"]["b"])
    assert np.all(ga[:, rank:] == 0) and np.all(gb[rank:] == 0)
    assert np.all(np.abs(ga[:, :rank]).sum(0) > 0) and np.all(np.abs(gb[:rank]).sum((1, 2)) > 0)


def test_full_rank_is_lora_and_zero_init_is_base():
    model = _model()
    x = RNG(0).standard_normal((3, 6), np.float32)
    y0 = model[0](x)
    lr.attach(model, ".*", lambda p, lin: DyLoRAConfig(rank=R, alpha=10.0).build(
        p, lin, rngs=nnx.Rngs(0)))  # fmt: skip
    ctx = Context.create(3, 1, rng=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(model[0](x, ctx)), np.asarray(y0))
    ad = model[0].adapter
    ad.b[...] = jnp.asarray(RNG(9).standard_normal(ad.b.shape, np.float32))
    lora = (10.0 / R) * np.einsum("ti,ir,rhd->thd", x, ad.a[...], ad.b[...])
    np.testing.assert_allclose(np.asarray(ad.delta_at(x, R)), lora, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model[0](x) - y0), lora, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4, 5])
def test_every_truncation_is_a_valid_adapter(rank):
    ad = _attach(_model(), DyLoRAConfig(rank=R, alpha=3.0))[0].adapter
    x = RNG(1).standard_normal((4, 6), np.float32)
    via_kernel = jnp.tensordot(x, ad.delta_kernel_at(rank), 1)
    np.testing.assert_allclose(np.asarray(ad.delta_at(x, rank)), np.asarray(via_kernel),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # uses only the first `rank` components: the nested LoRA of a[:, :b], b[:b]
    ref = (3.0 / rank) * np.einsum("ti,ir,rhd->thd", x, ad.a[...][:, :rank], ad.b[...][:rank])
    np.testing.assert_allclose(np.asarray(via_kernel), ref, rtol=1e-5, atol=1e-5)


def test_one_rank_per_step_for_all_layers_and_eval_rank():
    model = _attach(_model(2), DyLoRAConfig(rank=R, min_rank=2, eval_rank=3))
    x = RNG(0).standard_normal((2, 6), np.float32)
    seen = set()
    for s in range(12):
        key = jax.random.key(s)
        b = int(sample_rank(key, 2, R))
        seen.add(b)
        ctx = Context.create(2, 1, rng=key).at_layer(s % 2)
        for lin in model:
            got = lin.adapter.delta(x, ctx, base=None)
            np.testing.assert_allclose(np.asarray(got), np.asarray(lin.adapter.delta_at(x, b)))
    assert seen <= set(range(2, R + 1)) and len(seen) > 1
    ad = model[0].adapter
    np.testing.assert_allclose(np.asarray(ad.delta(x, None, base=None)),
                               np.asarray(ad.delta_at(x, 3)), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(ad.delta_kernel(None)),
                               np.asarray(ad.delta_kernel_at(3)), rtol=1e-6)  # fmt: skip


def test_validation():
    lin = _model()[0]
    with pytest.raises(ValueError, match=r"rank=7.*'m/q'"):
        DyLoRAConfig(rank=7).validate("m/q", lin)
    with pytest.raises(ValueError, match="eval_rank=6"):
        DyLoRAConfig(rank=5, eval_rank=6).validate("m/q", lin)
    with pytest.raises(ValueError, match="min_rank=0"):
        DyLoRAConfig(rank=5, min_rank=0).validate("m/q", lin)


def test_decoder_lm_jit_train_step():
    # built in one compiled program, called through one jitted forward (eagerly every op
    # compiles); the same parameters as the eager build
    model = nnx.jit(lambda: DecoderLM(get_config("llama-tiny", num_layers=1), rngs=nnx.Rngs(0)))()
    tokens = RNG(0).integers(0, 256, (2, 8)).astype(np.int32)
    fwd = nnx.jit(lambda m, t: m(t))
    base_logits = fwd(model, tokens)
    cfg = DyLoRAConfig(rank=4, alpha=8.0)
    paths = lr.attach(model, r"attn/(q|v)$", lambda p, lin: cfg.build(p, lin, rngs=nnx.Rngs(1)))
    assert len(paths) == 2
    np.testing.assert_array_equal(np.asarray(fwd(model, tokens)), np.asarray(base_logits))

    @nnx.jit
    def step(m, key):
        def loss(m):
            logits = m(tokens[:, :-1], rng=key)
            lp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

        return nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(m)

    key = jax.random.key(3)
    b = int(sample_rank(key, 1, 4))
    g = nnx.to_pure_dict(step(model, key))
    flat = jax.tree_util.tree_leaves_with_path(g)
    assert flat and all("adapter" in jax.tree_util.keystr(p) for p, _ in flat)
    for p, v in flat:
        v = np.asarray(v)
        if jax.tree_util.keystr(p).endswith("['a']"):
            assert np.all(v[..., b:] == 0)
        else:
            assert np.all(v[b:] == 0) and np.abs(v[:b]).sum() > 0
