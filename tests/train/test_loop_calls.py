"""How the training loop groups steps into calls (``train.loop.call_length``): every log, eval
and checkpoint step ends a call, calls are ``steps_per_call`` or one step long, and a run
resumed from a checkpoint ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from train_testlib import TINY_MODEL, tiny_config

from train.loop import call_length, train_loop
from train.pretrain import build_model


def _calls(start, config):
    calls, step = [], start
    while step < config.steps:
        calls.append((step, call_length(step, config)))
        step += calls[-1][1]
    return calls


@pytest.mark.parametrize("k", [1, 3, 4, 7, 64])
def test_calls_end_on_every_boundary(tmp_path, k):
    config = tiny_config(tmp_path, steps=50, log_every=6, eval_every=20, ckpt_every=8,
                         steps_per_call=k)  # fmt: skip
    calls = _calls(0, config)
    ends = {s + n for s, n in calls}
    boundaries = {s for s in range(1, 51) if s % 6 == 0 or s % 20 == 0 or s % 8 == 0} | {50}
    assert boundaries <= ends
    assert sum(n for _, n in calls) == 50
    assert {n for _, n in calls} <= {1, k}
    # no call runs across a boundary
    for s, n in calls:
        assert not any(s < b < s + n for b in boundaries), (s, n)
    # from any boundary the split is the one the uninterrupted run makes
    for b in sorted(boundaries - {50}):
        assert _calls(b, config) == [c for c in calls if c[0] >= b]
    if k == 4:  # the calls of the first 6 steps: 4, then 1 + 1 up to the log at 6
        assert calls[:3] == [(0, 4), (4, 1), (5, 1)]


def test_steps_per_call_must_be_positive(tmp_path):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="steps_per_call=0 must be positive"):
        tiny_config(tmp_path, steps_per_call=0)


def _params(result):
    return jax.tree.map(np.asarray, result.state["params"])


def test_multi_step_calls_resume_bit_identical_and_match_single_steps(tmp_path):
    """Calls of 3 steps (between checkpoints every 4): an uninterrupted run; a run whose
    newest checkpoint is deleted and resumed from the one before ends with the same bits;
    single-step calls give the same training to float tolerance."""
    changes = dict(steps=8, log_every=4, ckpt_every=4, steps_per_call=3, async_checkpoint=False)
    config = tiny_config(tmp_path / "a", **changes)
    model_config, model_fn = build_model(config)
    straight = train_loop(config, model_fn, model_config=model_config)
    assert _calls(0, config) == [(0, 3), (3, 1), (4, 3), (7, 1)]

    run_b = tiny_config(tmp_path / "b", **changes)
    train_loop(run_b, model_fn, model_config=model_config)
    shutil.rmtree(os.path.join(run_b.out_dir, "checkpoints", "8"))
    resumed = train_loop(run_b, model_fn, model_config=model_config)
    assert resumed.start_step == 4
    for x, y in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed))):
        assert np.array_equal(x, y)

    single = train_loop(
        tiny_config(tmp_path / "c", **(changes | {"steps_per_call": 1})),
        model_fn,
        model_config=model_config,
    )
    diff = jax.tree.map(lambda x, y: np.max(np.abs(x - y)), _params(straight), _params(single))
    assert max(jax.tree.leaves(diff)) < 1e-5


def test_dropout_run_resumes_bit_identical(tmp_path):
    """With attention and residual dropout each step's key comes from the saved state: steps
    continued from a checkpoint (``Checkpointer`` save + restore, as a resumed run does) draw
    the same masks and end with the same bits as the uninterrupted steps."""
    from jaxattn.sharding import make_mesh
    from train.checkpoints import Checkpointer
    from train.data import make_loaders
    from train.step import make_trainer

    dropout = TINY_MODEL + ("attention_dropout=0.2", "residual_dropout=0.2")
    config = tiny_config(tmp_path, model_overrides=dropout)
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh({"data": 1}, jax.devices()[:1]))
    loader, _ = make_loaders(config)
    batch = lambda step: trainer.put_batch(loader.batch(step))  # noqa: E731

    def steps(state, rest, start, stop):
        for step in range(start, stop):
            state, metrics = trainer.train_step(state, rest, batch(step))
        return state, metrics

    state, rest = trainer.init()
    nll, weight = trainer.eval_step(state["params"], rest, batch(0))
    straight, _ = steps(state, rest, 0, 4)
    final = jax.tree.map(np.asarray, straight["params"])

    state, rest = trainer.init()
    state, _ = steps(state, rest, 0, 2)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), every=2, async_save=False)
    ckpt.save(2, state, {"step": 2})
    restored, _ = ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    ckpt.close()
    resumed, _ = steps(restored, trainer.init()[1], 2, 4)
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(resumed["params"]), strict=True):
        assert np.array_equal(x, np.asarray(y))
    # dropout is on: the first step's train loss differs from the deterministic eval loss
    _, metrics = trainer.train_step(trainer.init()[0], rest, batch(0))
    assert abs(float(metrics["loss"]) - float(nll) / float(weight)) > 1e-4
