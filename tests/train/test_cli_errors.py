"""Every usage error of the command lines (pretrain, finetune, sample) is one line,
``config error: ...`` naming the flag and what was expected, exit code 2, with nothing
created on disk; ``--help`` lists every ``--set`` key; ``--config`` works from any directory;
reading a checkpoint prints no orbax noise."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from train_testlib import TINY_MODEL, set_args

from train import finetune, pretrain, sample
from train.config import TrainConfig, load_config


def _model(**fields) -> tuple:
    """TINY_MODEL with fields replaced (or added); a field set to None is dropped."""
    kept = [o for o in TINY_MODEL if o.split("=")[0] not in fields]
    return tuple(kept + [f"{k}={v}" for k, v in fields.items() if v is not None])


def _usage_error(main, argv, capsys) -> str:
    """Run ``main(argv)``; it must exit with code 2 and one line on stderr, returned."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("config error: "), err
    return err[0]


def _data_file(tmp_path, kind: str) -> str:
    path = tmp_path / {"small": "small.txt", "float": "f.npy", "negative": "n.npy"}[kind]
    if kind == "small":
        path.write_text("too short for a batch")
    else:
        ids = np.arange(5000) % 200 - (1 if kind == "negative" else 0)
        np.save(path, ids.astype(np.float32 if kind == "float" else np.int32))
    return str(path)


PRETRAIN_CASES = {
    "model": ({"model": "gpt2"}, "model='gpt2' is not one of"),
    "override_typo": (
        {"model_overrides": _model(num_layers=None, num_layer=2)},
        "has no field 'num_layer'; did you mean ['num_layers'",
    ),
    "zero_layers": ({"model_overrides": _model(num_layers=0)}, "num_layers"),
    "bad_impl": ({"model_overrides": _model(implementation="flash")}, "flash"),
    "mesh": ({"mesh_data": 4}, "mesh_data=4 x mesh_fsdp=1 x mesh_tensor=1 needs 4 devices but 8"),
    "batch": ({"batch_size": 12}, "must be a multiple of the batch-parallel size 8"),
    "missing_data": ({"data": "/nope/tokens.txt"}, "data='/nope/tokens.txt' does not exist"),
    "small_data": ({"data": "small"}, "fewer than one batch of batch_size=8 rows"),
    "float_npy": ({"data": "float"}, "need a 1-D integer array of token ids, got"),
    "negative_ids": ({"data": "negative"}, "holds token id -1 but the model's vocab_size"),
    "init_from": ({"init_from": "/x"}, "init_from='/x' is read by train.finetune"),
    "regex": ({"optimizer": "adamw:("}, "optimizer rule 'adamw:(': '(' is not a regex"),
    "rule_syntax": ({"optimizer": "adamw"}, "optimizer rule 'adamw' must look like name:regex"),
    "frozen_all": ({"optimizer": "frozen:.*"}, "trains no parameter (every parameter is frozen)"),
    "factory": ({"optimizer": "adamm:.*"}, "no optimizer named 'adamm'; did you mean ['adamw']"),
    "factory_arg": ({"optimizer": "adamw(rnk=2):.*"}, "adamw takes no argument ['rnk']"),
    "no_match": (
        {"optimizer": "frozen:^layers/0/atn/,adamw:.*"},
        "rule 0 'frozen:^layers/0/atn/' matches no parameter; close matches: ['layers/0/attn/",
    ),
    "uncovered": ({"optimizer": "adamw:^layers/"}, "no rule takes 3 parameters (['embed/"),
    "shadowed": ({"optimizer": "adamw:.*,frozen:^embed/"}, "matches only parameters that earlier"),
    "sample_tokens": ({"sample_tokens": -1}, "sample_tokens=-1 must be >= 0"),
    "clip": ({"clip_norm": 0}, "clip_norm=0.0 must be > 0"),
    "nonfinite": ({"nonfinite": "ignore"}, "nonfinite='ignore' is not one of ('stop', 'skip')"),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN_CASES))
def test_pretrain_usage_errors(case, tmp_path, capsys):
    changes, message = PRETRAIN_CASES[case]
    if changes.get("data") in ("small", "float", "negative"):
        changes = changes | {"data": _data_file(tmp_path, changes["data"])}
    run = tmp_path / "run"
    err = _usage_error(pretrain.main, set_args(changes | {"run_dir": str(run)}), capsys)
    assert message in err
    assert not run.exists()


def test_config_file_errors_and_paths(tmp_path, capsys, monkeypatch):
    err = _usage_error(pretrain.main, ["--config", "nope.py"], capsys)
    assert "--config 'nope.py' does not exist" in err and "recall.py" in err
    monkeypatch.chdir(tmp_path)  # outside the repository
    for path in ("train/configs/recall.py", "recall", "recall.py"):
        assert load_config(path).data == "recall"
    (tmp_path / "recall.py").write_text("from train.config import TrainConfig\n"
                                        "CONFIG = TrainConfig(name='mine')\n")  # fmt: skip
    assert load_config("recall.py").name == "mine"  # the current directory first


def test_help_lists_every_key_with_type_and_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for name in TrainConfig.__dataclass_fields__:
        assert f"\n  {name} " in out, name
    assert "seq_len              int, default 128" in out
    assert "nonfinite            str, default 'stop'; one of stop, skip" in out


def test_finetune_usage_errors(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    (tmp_path / "no_steps").mkdir()
    (tmp_path / "no_steps" / "config.json").write_text("{}")
    cases = {
        "": "finetuning needs init_from=",
        str(tmp_path / "nope"): "does not exist",
        str(tmp_path / "empty"): "holds no checkpoint steps",
        str(tmp_path / "other"): "holds no checkpoint steps",
        str(tmp_path / "no_steps"): "holds no checkpoint steps",
    }
    for init_from, message in cases.items():
        run = tmp_path / "ft"
        argv = set_args({"init_from": init_from, "run_dir": str(run), "model_overrides": ()})
        err = _usage_error(finetune.main, argv, capsys)
        assert message in err and (f"init_from={init_from!r}" in err or not init_from), err
        assert not run.exists()
    model = _model(num_layers=3)
    argv = set_args({"init_from": str(tiny_run), "run_dir": str(tmp_path / "ft")})
    argv += ["--set", f"model_overrides={','.join(model)}"]
    err = _usage_error(finetune.main, argv, capsys)
    assert "holds other parameters than the model" in err and "layers/2/" in err


def test_sample_usage_errors(tiny_run, capsys):
    cases = {
        ("--checkpoint", "/nope"): "--checkpoint '/nope' does not exist",
        ("--step", "99"): "--step 99: ",
        ("--top-k", "0"): "--top-k 0 must be in [1, 256]",
        ("--temperature", "-1"): "--temperature -1.0 must be >= 0",
        ("--max-new-tokens", "0"): "--max-new-tokens 0 must be >= 1",
    }
    for flags, message in cases.items():
        argv = ["--checkpoint", str(tiny_run), "--prompt", "def ", *flags]
        assert message in _usage_error(sample.main, argv, capsys)
    err = _usage_error(sample.main, ["--checkpoint", str(tiny_run), "--prompt", ""], capsys)
    assert "--prompt must be non-empty" in err


def test_reading_a_checkpoint_logs_no_orbax_noise(tiny_run, caplog):
    caplog.set_level(logging.INFO)
    model, meta = sample.load_model(str(tiny_run))
    assert meta["step"] == 4
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == [], noisy
    assert os.path.isdir(tiny_run / "checkpoints" / "4")
