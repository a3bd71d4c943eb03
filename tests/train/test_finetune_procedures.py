"""``train.finetune --adapter increlora`` runs IncreLoRA's rank-growth procedure by name (the
rule of ``IncreLoRAConfig.training_rules``): the active masks the procedure writes grow to the
budget, the base stays bit-identical, the adapter (masks included) is saved alone."""

from __future__ import annotations

import os

import jax
import numpy as np
from train_testlib import tiny_config

from train import finetune
from train.adapters import adapter_rules
from train.checkpoints import read_meta
from train.optim import path_string


def _flat(params) -> dict:
    return {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


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
