"""``train.finetune --adapter increlora`` runs IncreLoRA's rank-growth procedure by name (the
rule of ``IncreLoRAConfig.training_rules``): the active masks the procedure writes grow to the
budget, the base stays bit-identical, the adapter (masks included) is saved alone."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_testlib import tiny_config

from jaxattn import lowrank
from jaxattn.layers import Linear
from train import finetune
from train.adapters import adapter_rules
from train.checkpoints import read_meta
from train.config import TrainConfig
from train.optim import make_optimizer, param_infos, path_string, split_params


def _flat(params) -> dict:
    return {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


# slow tier: the default run keeps IncreLoRA's growth by importance within the budget
# (test_increlora.py) and its procedure by name (test_each_method_names_a_procedure...)
@pytest.mark.slow
def test_increlora_finetune_grows_rank_to_the_budget_by_name(tiny_run, tmp_path):
    # 2 modules (attn/q of both layers) start at rank 1 of max 3; budget 2 x target_rank 2 = 4;
    # one component per growth, one module per growth, every step: 2 steps fill the budget.
    options = ("rank=1", "max_rank=3", "target_rank=2", "add_rank=1", "interval=1",
               "top_h=1", "targets=attn/q$")  # fmt: skip
    config = tiny_config(
        tmp_path / "incre", init_from=str(tiny_run), adapter="increlora", adapter_options=options,
        steps=2, warmup_steps=1, ckpt_every=2, async_checkpoint=False, lr=1e-2,
    )  # fmt: skip
    rules = adapter_rules(config)
    assert rules[0].startswith("increlora(target_rank=2, add_rank=1, interval=1, warmup=0, top_h=1")
    assert rules[0].endswith("):/adapter/") and rules[1:] == ("frozen:.*",)
    result = finetune.run(config)
    after = _flat(result.state["params"])
    _, base = finetune.load_init(str(tiny_run))
    for key, x in _flat(base).items():
        assert np.array_equal(after[key], x), key
    active = {k: v for k, v in after.items() if k.endswith("/adapter/adapters/default/active")}
    assert sorted(active) == [f"layers/{i}/attn/q/adapter/adapters/default/active" for i in (0, 1)]
    ranks = sorted(int(v.sum()) for v in active.values())
    assert sum(ranks) == 4 and ranks[-1] <= 3  # the budget, filled and never exceeded
    for v in active.values():  # active components are a prefix
        n = int(v.sum())
        np.testing.assert_array_equal(v, np.arange(3) < n)
    assert os.path.isfile(os.path.join(config.out_dir, "adapter", "adapter.safetensors"))
    meta = read_meta(os.path.join(config.out_dir, "checkpoints"), 2)
    assert tuple(meta["config"]["optimizer"])[0] == rules[0]


@pytest.mark.parametrize("method", ["lorasb", "increlora", "loraprune", "sora"])
def test_each_method_names_a_procedure_the_optimizer_builds(method):
    # the rules of MethodConfig.training_rules parse, their factory takes the arguments, the
    # optimizer runs a step; LoRA-SB trains r alone (k² per matrix), the others every leaf
    model = nnx.List([Linear((8,), (4, 2), axes=("embed", None, None), rngs=nnx.Rngs(0))])
    options = {"rank": 2} | ({"max_rank": 4, "target_rank": 3, "add_rank": 1}
                             if method == "increlora" else {})  # fmt: skip
    if method == "loraprune":
        options["prune"] = ".*"
    lowrank.apply(model, lowrank.AdapterConfig(method=method, options=options, targets=".*"),
                  rngs=nnx.Rngs(1))  # fmt: skip
    rules = lowrank.make_method(method, **options).training_rules()
    params = nnx.state(model, nnx.Param)
    tx, trainable = make_optimizer(
        TrainConfig(optimizer=rules, steps=10, warmup_steps=1), param_infos(params)
    )
    prefix = "0/adapter/adapters/default/"
    if method == "lorasb":
        assert trainable == {prefix + "r"}
    else:
        assert trainable == {p for p in param_infos(params) if p.startswith(prefix)}
    mine, _ = split_params(nnx.to_pure_dict(params), trainable)
    grads = jax.tree.map(jnp.ones_like, mine)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(mine), mine)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
