"""Finetuning from a jaxattn checkpoint with regex-frozen parameters, from a Hugging Face
directory, and sampling a checkpoint with ``python -m train.sample``."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
from train_testlib import tiny_config

from train import finetune, pretrain, sample
from train.optim import path_string

FROZEN = (r"^embed/", r"^layers/0/")


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
        tmp_path, steps=2, warmup_steps=1, init_from=str(pretrained), frozen=FROZEN
    )
    result = finetune.run(config)
    before, after = _flat(start), _flat(jax.tree.map(np.asarray, result.state["params"]))
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("embed/", "layers/0/"))]
    assert frozen and len(frozen) < len(before)
    for key in before:
        same = np.array_equal(before[key], after[key])
        assert same == (key in frozen), key


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
    config = tiny_config(tmp_path / "ft", steps=2, warmup_steps=1, init_from=str(tmp_path / "hf"))
    config = dataclasses.replace(config, model_overrides=())  # the HF config defines the model
    result = finetune.run(config)
    assert np.isfinite(result.eval_loss)


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
