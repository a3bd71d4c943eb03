"""Fine-tuning into a model with extra leaves (a test-local adapter attached by path): base
leaves strict, new ones fresh; fine-tuning checkpoints hold only the non-frozen leaves plus a
reference to the base, resume bit-identically and refuse a base that changed."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from train_testlib import RULES, TINY_MODEL, extend, tiny_config

from train import finetune, sample
from train.checkpoints import read_meta
from train.config import ConfigError
from train.optim import path_string


def _flat(params) -> dict:
    return {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_finetune_into_extra_leaves_saves_trainables_and_resumes_exactly(tiny_run, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_run, base_dir)
    _, base = finetune.load_init(str(base_dir))
    base = _flat(base)
    changes = dict(steps=4, warmup_steps=1, ckpt_every=2, async_checkpoint=False)
    config = tiny_config(tmp_path / "ft", init_from=str(base_dir), optimizer=RULES, **changes)
    straight = finetune.run(config, extend=extend)
    after = _flat(straight.state["params"])
    adapters = sorted(k for k in after if "/adapter/" in k)
    assert adapters == [f"layers/{i}/attn/q/adapter/{n}" for i in (0, 1) for n in "ab"]
    assert after.keys() - set(adapters) == base.keys()
    for key in base:  # frozen base leaves: exactly the base
        assert np.array_equal(after[key], base[key]), key
    assert not np.array_equal(after["layers/1/attn/q/adapter/b"], 0)  # the adapters trained

    ckpts = os.path.join(config.out_dir, "checkpoints")
    meta = read_meta(ckpts, 4)
    assert sorted(meta["leaf_checksums"]["params"]) == adapters  # no base leaf saved again
    assert meta["base"]["init_from"] == str(base_dir) and len(meta["base"]["digest"]) == 64

    shutil.rmtree(os.path.join(ckpts, "4"))
    resumed = finetune.run(config, extend=extend)
    assert resumed.start_step == 2
    for key, x in _flat(resumed.state["params"]).items():
        assert np.array_equal(x, after[key]), key

    with pytest.raises(ValueError, match="attached in code"):  # sampling needs the adapters
        sample.load_model(str(tmp_path / "ft"))

    shutil.rmtree(os.path.join(ckpts, "4"))
    shutil.rmtree(base_dir / "checkpoints" / "4")  # the base is now its step 2: another base
    with pytest.raises(ConfigError, match="is not the base this fine-tuning run started from"):
        finetune.run(config, extend=extend)


def test_finetune_refuses_a_model_without_every_base_leaf(tiny_run, tmp_path):
    one_layer = tuple(o for o in TINY_MODEL if not o.startswith("num_layers")) + ("num_layers=1",)
    config = tiny_config(tmp_path, init_from=str(tiny_run), model_overrides=one_layer)
    with pytest.raises(ConfigError, match="not in the model: layers/1/"):
        finetune.run(config)
