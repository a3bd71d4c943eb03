"""Finetuning from a jaxattn checkpoint with parameters frozen by optimizer rules, from a
Hugging Face directory into a model with extra leaves, and sampling a checkpoint with
``python -m train.sample``."""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx
from train_testlib import RULES, extend, tiny_config

from train import finetune, pretrain, sample
from train.checkpoints import read_meta
from train.optim import path_string

FROZEN = (r"frozen:^embed/", r"frozen:^layers/0/", "adamw:.*")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pre")
    pretrain.run(tiny_config(run_dir, steps=3, ckpt_every=3))
    return run_dir


def _flat(params) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {path_string(p): np.asarray(x) for p, x in leaves}


def test_finetune_freezes_by_pattern_and_trains_the_rest(pretrained, tmp_path):
    model_config, start = finetune.load_init(str(pretrained))
    assert model_config.num_layers == 2
    config = tiny_config(
        tmp_path, steps=2, warmup_steps=1, init_from=str(pretrained), optimizer=FROZEN
    )
    result = finetune.run(config)
    before, after = _flat(start), _flat(jax.tree.map(np.asarray, result.state["params"]))
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("embed/", "layers/0/"))]
    assert frozen and len(frozen) < len(before)
    for key in before:
        same = np.array_equal(before[key], after[key])
        assert same == (key in frozen), key
    # its checkpoint holds the trained leaves only; sampling follows the base reference
    saved = read_meta(os.path.join(config.out_dir, "checkpoints"))["leaf_checksums"]["params"]
    assert sorted(saved) == sorted(set(before) - set(frozen))
    model, _ = sample.load_model(config.out_dir)
    for key, x in _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items():
        assert np.array_equal(x, after[key]), key


def test_finetune_starts_from_a_hugging_face_directory(pretrained, tmp_path):
    from models import to_hf

    model, _ = sample.load_model(str(pretrained))
    to_hf(model, str(tmp_path / "hf"))
    assert finetune.is_hf_dir(str(tmp_path / "hf"))
    model_config, params = finetune.load_init(str(tmp_path / "hf"))
    expected = _flat(jax.tree.map(np.asarray, model_from_dir(pretrained)))
    got = _flat(params)
    assert got.keys() == expected.keys()
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, err_msg=key)
    config = tiny_config(tmp_path / "ft", steps=2, warmup_steps=1, init_from=str(tmp_path / "hf"),
                         optimizer=RULES)  # fmt: skip
    config = dataclasses.replace(config, model_overrides=())  # the HF config defines the model
    result = finetune.run(config, extend=extend)  # into a model with adapters on attn/q
    assert np.isfinite(result.eval_loss)
    after = _flat(jax.tree.map(np.asarray, result.state["params"]))
    assert sorted(after.keys() - got.keys()) == [
        f"layers/{i}/attn/q/adapter/{n}" for i in (0, 1) for n in "ab"
    ]
    for key in got:  # base leaves strict, from the HF files
        assert np.array_equal(after[key], got[key]), key
    assert not np.array_equal(after["layers/0/attn/q/adapter/b"], 0)


def model_from_dir(run_dir):
    from flax import nnx

    model, _ = sample.load_model(str(run_dir))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_sample_cli_generates_text(pretrained, capsys):
    sample.main(
        [
            "--checkpoint",
            str(pretrained),
            "--prompt",
            "def ",
            "--prompt",
            "The",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.8",
            "--top-k",
            "20",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "checkpoint step 3"
    assert out[1].startswith("def ") and out[2].startswith("The")
    assert os.path.exists(os.path.join(pretrained, "metrics.jsonl"))


def test_sample_cli_takes_a_cache_format_by_name(pretrained, capsys):
    argv = ["--checkpoint", str(pretrained), "--prompt", "The", "--max-new-tokens", "4"]
    kivi = ["--set", "cache.format=kivi", "--set", "cache.bits=4", "--set", "cache.group_size=4",
            "--set", "cache.residual=8"]  # fmt: skip
    sample.main(argv + kivi)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "checkpoint step 3" and out[1].startswith("The")
    for bad, match in (
        (["--set", "cache.bits=5"], r"config error: --set cache.\*: CacheConfig.bits=5"),
        (["--set", "cache.bitz=2"], r"config error: --set cache.bitz: CacheConfig has no field"),
        (["--set", "format=kivi"], r"config error: --set 'format=kivi' must look like cache"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            sample.main(argv + kivi[:2] + bad)
        assert exit_info.value.code == 2
        assert re.search(match, capsys.readouterr().err)
