"""LoRAM: keep-all pruning is the identity; the recovered LoRA's ΔW equals the pruned model's
ΔW on the kept coordinates and is exactly 0 on the pruned ones; and the full model with its
pruned structures zeroed, carrying the recovered LoRA, gives the pruned model's logits."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam
from jaxattn.lowrank import loram
from models import DecoderLM, get_config

fwd = nnx.jit(lambda m, t: m(t))


def _delta(lin):
    """s·a·b of a projection's LoRA as [*in, *out] (numpy: no per-shape device compiles)."""
    ad = lin.adapter if not hasattr(lin.adapter, "adapters") else lin.adapter.adapters["default"]
    a, b = np.asarray(ad.a[...]), np.asarray(ad.b[...])
    return ad.scaling * np.tensordot(a, b, 1)


@pytest.fixture(scope="module")
def setup():
    cfg = get_config("llama-tiny", num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=32)
    full = nnx.jit(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))()  # one compile, the eager values
    tokens = np.random.default_rng(0).integers(0, 256, (2, 5)).astype(np.int32)
    return full, tokens


def test_keep_all_is_identity(setup):
    full, tokens = setup
    plan = loram.PruningPlan(kv_heads=((0, 1),), mlp=(tuple(range(32)),))
    small = loram.prune_model(full, plan)
    np.testing.assert_array_equal(np.asarray(fwd(small, tokens)), np.asarray(fwd(full, tokens)))


def test_recovery_is_exact_reduction(setup):
    full, tokens = setup
    plan = loram.l2_plan(full, kv_keep=1, mlp_keep=20)
    assert len(plan.kv_heads[0]) == 1 and len(plan.mlp[0]) == 20
    small = loram.prune_model(full, plan)
    assert lr.linear_paths(small)["layers/0/attn/q"].out_shape == (2, 16)
    cfg = lr.AdapterConfig("lora", {"rank": 2}, targets="layers/")
    nnx.jit(lambda m: (lr.apply(m, cfg, rngs=nnx.Rngs(1)), None)[1])(small)  # one compile
    state = nnx.state(small, AdapterParam)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(3)  # numpy draws: no per-shape device compiles
    nnx.update(small, jax.tree.unflatten(tree, [0.1 * rng.standard_normal(v.shape, np.float32)
                                                for v in leaves]))  # fmt: skip
    full_copy = nnx.clone(full)
    paths = loram.recover(small, full_copy, plan)
    assert len(paths) == 7
    ls, lf = lr.linear_paths(small), lr.linear_paths(full_copy)
    for p in paths:
        d_small, d_full = (_delta(m[p]) for m in (ls, lf))
        kept = plan.kept(full.config, 0)
        axes = tuple(lf[p].kernel.get_metadata()["out_sharding"])
        idx = tuple(kept[n] if n in kept else np.arange(s) for n, s in zip(axes, d_full.shape))
        np.testing.assert_allclose(d_full[np.ix_(*idx)], d_small, rtol=1e-6, atol=1e-7)
        rest = d_full.copy()
        rest[np.ix_(*idx)] = 0
        np.testing.assert_array_equal(rest, 0)
        assert np.abs(d_small).max() > 0
    loram.zero_pruned(full_copy, plan)
    np.testing.assert_allclose(np.asarray(fwd(full_copy, tokens)), np.asarray(fwd(small, tokens)),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_plan_validation(setup):
    full, _ = setup
    c = full.config
    for plan, field in [
        (loram.PruningPlan(kv_heads=((0, 2),), mlp=((0,),)), "kv_heads"),
        (loram.PruningPlan(kv_heads=((0,),), mlp=((3, 1),)), "mlp"),
        (loram.PruningPlan(kv_heads=((0,), (1,)), mlp=((0,),)), "kv_heads"),
    ]:
        with pytest.raises(ValueError, match=field):
            plan.check(c)
