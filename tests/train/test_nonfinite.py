"""Non-finite steps: ``nonfinite="skip"`` leaves the state unchanged inside the compiled step
(also within a multi-step call), ``"stop"`` ends the run at the exact step with the metrics so
far and the last good checkpoint kept, and nothing non-finite is ever saved."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from train_testlib import bigram, tiny_config

import train.setup
from jaxattn.sharding import make_mesh
from train.cli import guarded
from train.data import make_loaders
from train.loop import train_loop
from train.step import make_trainer


@pytest.fixture(scope="module")
def skipping(tmp_path_factory):
    """A 1-device trainer of :class:`Bigram` with ``nonfinite="skip"``, good batches, and a
    batch whose loss weights are NaN."""
    config = tiny_config(tmp_path_factory.mktemp("run"), nonfinite="skip")
    trainer = make_trainer(bigram, config, make_mesh({"data": 1}, jax.devices()[:1]))
    loader, _ = make_loaders(config)
    good = [loader.batch(i) for i in range(3)]
    bad = good[1] | {"weights_BT": good[1]["weights_BT"] * np.nan}
    return trainer, good, bad


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_skip_leaves_the_state_unchanged_inside_the_step(skipping):
    trainer, good, bad = skipping
    state, rest = trainer.init()
    before = _host(state)
    state, metrics = trainer.train_step(state, rest, trainer.put_batch(bad))
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 1  # the data moves on
    assert _same(_host(state["params"]), before["params"])
    assert _same(_host(state["opt_state"]), before["opt_state"])
    state, metrics = trainer.train_step(state, rest, trainer.put_batch(good[0]))
    assert bool(metrics["finite"]) and not _same(_host(state["opt_state"]), before["opt_state"])


def test_skip_inside_a_multi_step_call(skipping):
    """``train_steps`` over [good, bad, good]: per-step flags, and the bad step changes
    nothing: the result equals two single steps on the good batches."""
    trainer, good, bad = skipping
    state, rest = trainer.init()
    init = _host(state)
    stacked = {k: np.stack([good[0][k], bad[k], good[2][k]]) for k in good[0]}
    state, metrics = trainer.train_steps(state, rest, trainer.put_batches(stacked))
    assert np.asarray(metrics["finite"]).tolist() == [True, False, True]
    assert int(state["step"]) == 3
    ref = jax.device_put(init, trainer.state_shardings)
    for batch in (good[0], good[2]):
        ref, _ = trainer.train_step(ref, rest, trainer.put_batch(batch))
    diff = jax.tree.map(lambda x, y: np.max(np.abs(x - y)), _host(state["params"]),
                        _host(ref["params"]))  # fmt: skip
    assert 0 < max(jax.tree.leaves(diff)) < 1e-6 or _same(state["params"], ref["params"])


def _files(root) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


# steps_per_call=3 between boundaries every 4 steps: calls (0,3) (3,1) (4,3) (7,1) (8,3) ...
LOOP = dict(steps=12, warmup_steps=1, log_every=4, ckpt_every=4, eval_every=1000,
            steps_per_call=3, async_checkpoint=False)  # fmt: skip
NAN_BATCH = 5  # step 6, inside the call (4, 3)


@pytest.fixture
def poisoned(monkeypatch):
    """Training batch ``NAN_BATCH`` gets NaN loss weights: its loss and gradients are NaN."""
    make_loaders = train.setup.make_loaders

    def poisoned_loaders(*args, **kwargs):
        train_data, eval_data = make_loaders(*args, **kwargs)
        clean = train_data.batch

        def batch(step):
            rows = clean(step)
            return rows | {"weights_BT": rows["weights_BT"] * np.nan} if step == NAN_BATCH else rows

        train_data.batch = batch
        return train_data, eval_data

    monkeypatch.setattr(train.setup, "make_loaders", poisoned_loaders)


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stop_names_the_exact_step_and_keeps_the_run(poisoned, tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config(run, **LOOP)
    with pytest.raises(SystemExit) as exit_:
        guarded(lambda: train_loop(config, bigram))
    assert exit_.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("training stopped: non-finite loss at step 6 "), last
    assert "the last checkpoint (step 4) is untouched" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4"]
    rows = _rows(run)
    assert [(r["step"], r["split"]) for r in rows] == [(0, "start"), (4, "train"), (6, "nonfinite")]
    assert rows[2]["loss"] == "nan"


def test_skip_counts_the_step_and_finishes(poisoned, tmp_path, capsys):
    run = tmp_path / "run"
    result = train_loop(tiny_config(run, nonfinite="skip", **LOOP), bigram)
    assert "step 8: skipped 1 non-finite steps (1 so far)" in capsys.readouterr().out
    train = {r["step"]: r for r in _rows(run) if r["split"] == "train"}
    assert train[8]["skipped"] == 1 and "skipped" not in train[4] and "skipped" not in train[12]
    assert all(np.isfinite(r["loss"]) for r in train.values()) and np.isfinite(result.eval_loss)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["12", "4", "8"]
