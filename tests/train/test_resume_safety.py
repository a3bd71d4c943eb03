"""Resuming never loses an earlier run: a changed model or meaning-changing train config stops
before touching anything, naming every differing field; harmless changes resume, are logged
and recorded; metrics are only appended (readers take the last row per step); starting over
needs ``overwrite=true``; keep-N counts only good checkpoints; a finished run says why it
trains nothing."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_STEPS
from train_testlib import TINY_MODEL, bigram, flip_bytes, largest_file, set_args, tiny_config

from train import pretrain
from train.checkpoints import Checkpointer
from train.config import ConfigError
from train.loop import train_loop
from train.metrics import MetricsWriter, latest_rows, read_metrics


def _snapshot(root) -> dict:
    """Every file under ``root``: bytes and modification time."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_another_model_or_meaning_changing_config_refuses_and_touches_nothing(tiny_run, capsys):
    before = _snapshot(tiny_run)
    model = tuple("num_layers=3" if o.startswith("num_layers=") else o for o in TINY_MODEL)
    changes = {"run_dir": str(tiny_run), "model_overrides": model, "seq_len": 64, "steps": 9}
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(set_args(TINY_STEPS | changes))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"config error: run_dir={str(tiny_run)!r} holds a run (checkpoint ")
    assert "model_config.num_layers: 2 -> 3" in err[0] and "seq_len: 32 -> 64" in err[0]
    assert "steps" not in err[0].split("computes:")[1].split(". Resume")[0]  # harmless
    assert "overwrite=true" in err[0]
    assert _snapshot(tiny_run) == before


BIGRAM = dict(steps=4, warmup_steps=1, ckpt_every=2, log_every=1, async_checkpoint=False)


def test_harmless_changes_resume_append_and_are_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    train_loop(tiny_config(run, **BIGRAM), bigram)
    before = {name: _snapshot(run / "checkpoints" / name) for name in ("2", "4")}
    config_json, metrics = (run / "config.json").read_bytes(), (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    result = train_loop(tiny_config(run, **BIGRAM | {"steps": 6, "log_every": 2}), bigram)
    out = capsys.readouterr().out
    assert "resumed at step 4" in out and result.start_step == 4
    assert repr(result).startswith(f"RunResult(run_dir={str(run)!r}, steps 4->6, ")  # short
    assert "resuming with changed settings: log_every: 1 -> 2; steps: 4 -> 6" in out
    assert (run / "config.json").read_bytes() == config_json  # the run's first config
    assert (run / "metrics.jsonl").read_bytes().startswith(metrics)
    assert {name: _snapshot(run / "checkpoints" / name) for name in ("2", "4")} == before
    rows = read_metrics(run / "metrics.jsonl")
    resume = next(r for r in rows if r["split"] == "resume")
    assert resume["step"] == 4 and resume["changes"] == ["log_every: 1 -> 2", "steps: 4 -> 6"]
    assert [r["step"] for r in latest_rows(rows, "train")] == [1, 2, 3, 4, 6]
    # a finished run trains nothing and says how to continue
    train_loop(tiny_config(run, **BIGRAM | {"steps": 6, "log_every": 2}), bigram)
    assert (
        f"{run} is already at step 6 (steps=6): nothing to train; pass --set steps=N with "
        "N > 6 to continue, or --set overwrite=true to start over" in capsys.readouterr().out
    )


def test_starting_over_needs_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    train_loop(tiny_config(run, **BIGRAM), bigram)
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="resume=false but run_dir=.* holds an earlier run"):
        train_loop(tiny_config(run, resume=False, **BIGRAM), bigram)
    assert _snapshot(run) == before
    capsys.readouterr()
    result = train_loop(tiny_config(run, overwrite=True, **BIGRAM | {"steps": 2}), bigram)
    out = capsys.readouterr().out
    assert "overwrite=true: deleted checkpoints, metrics.jsonl, config.json of the earlier" in out
    assert result.start_step == 0 and (run / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(run / "checkpoints")) == ["2"]
    assert [r["split"] for r in read_metrics(run / "metrics.jsonl")][0] == "start"


def test_a_directory_holding_no_run_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not empty and holds no run"):
        train_loop(tiny_config(tmp_path, **BIGRAM), bigram)
    assert os.listdir(tmp_path) == ["mine.txt"]
    with pytest.raises(ConfigError, match="is a file"):
        train_loop(tiny_config(tmp_path / "mine.txt", **BIGRAM), bigram)


def _toy_state(value: float) -> dict:
    return {
        "params": {"w": jnp.full((4, 4), value)},
        "opt_state": {"m": jnp.zeros((4, 4))},
        "step": jnp.int32(value),
        "rng": jnp.zeros((2,), jnp.uint32),
    }


def test_keep_n_counts_only_good_steps(tmp_path):
    """Newer corrupt steps neither count towards keep-N nor push out the last good one; a
    bad step is never deleted, and saving its step again keeps it beside."""
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, every=1, keep=3, async_save=False)
    for step in (2, 6, 8):
        ckpt.save(step, _toy_state(step), {})
    ckpt.close()
    for step in (6, 8):
        flip_bytes(largest_file(tmp_path / "checkpoints" / str(step) / "params"), 64)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _toy_state(0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ckpt = Checkpointer(directory, every=1, keep=2, async_save=False)
    state, meta = ckpt.restore(abstract, jax.tree.map(lambda _: device, abstract))
    assert meta["step"] == 2 and ckpt.bad == {6, 8}
    ckpt.save(4, _toy_state(4), {})  # orbax's own keep-2 would now delete 2 and 4
    assert sorted(ckpt.manager.all_steps()) == [2, 4, 6, 8]
    ckpt.save(6, _toy_state(6), {})
    assert sorted(os.listdir(directory)) == ["4", "6", "6.corrupt-0", "8"]
    ckpt.close()


def test_metrics_readers_take_the_last_row_per_step(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, "train", {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tra')  # a process killed mid-line
    writer = MetricsWriter(str(tmp_path), tensorboard=False)  # the resumed run (from 2)
    writer.event(2, "resume", changes=[])
    writer.write(3, "train", {"loss": 30.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in latest_rows(rows, "train")] == [
        (1, 1.0), (2, 2.0), (3, 30.0),
    ]  # fmt: skip
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[2])["loss"] == 3.0  # nothing rewritten
    assert np.isclose(latest_rows(rows)[-1]["loss"], 30.0)
