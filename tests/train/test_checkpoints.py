"""Checkpoints: a run killed with SIGKILL and restarted ends bit-identical to an uninterrupted
run; a truncated latest step is detected, left in place, and the last good one used;
restoring onto another mesh reshards."""

from __future__ import annotations

import os
import signal
import subprocess

import jax
import numpy as np
import pytest
from train_testlib import REPO, cli_env, pretrain_cmd, run_ok, tiny_config

from jaxattn.sharding import make_mesh
from train.checkpoints import Checkpointer, restore_params
from train.pretrain import build_model
from train.step import make_trainer

STEPS = 8
MESH = dict(mesh_data=2, mesh_fsdp=2)  # 4 fake devices in the subprocesses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run dir of a run trained straight through to STEPS (checkpoints every 2 steps)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_ok(pretrain_cmd(run_dir, steps=STEPS, **MESH), cli_env(4))
    return run_dir


def _trainer(run_dir, mesh_shape, devices=None):
    config = tiny_config(run_dir, steps=STEPS)
    _, model_fn = build_model(config)
    return make_trainer(model_fn, config, make_mesh(mesh_shape, devices))


def _final_params(run_dir):
    trainer = _trainer(run_dir, {"data": 1}, jax.devices()[:1])
    params, meta = restore_params(
        os.path.join(run_dir, "checkpoints"), trainer.abstract_state["params"], step=STEPS
    )
    assert meta["step"] == STEPS
    return jax.tree.map(np.asarray, params)


def test_sigkill_at_a_step_then_restart_is_bit_identical(uninterrupted, tmp_path):
    kill_at = int(np.random.default_rng(0).integers(3, STEPS - 1))  # an arbitrary middle step
    cmd = pretrain_cmd(tmp_path, steps=STEPS, **MESH)
    env = cli_env(4)
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {kill_at:>6}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    out = run_ok(cmd, env)
    assert "resumed at step" in out, out[-3000:]
    resumed_at = int(out.split("resumed at step")[1].split()[0])
    assert 0 < resumed_at <= kill_at
    a, b = _final_params(uninterrupted), _final_params(tmp_path)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y)


def test_truncated_latest_checkpoint_falls_back_to_last_good(uninterrupted, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    os.system(f"cp -r {uninterrupted}/checkpoints {ckpt_dir}")
    files = [os.path.join(d, f) for d, _, fs in os.walk(ckpt_dir / str(STEPS)) for f in fs]
    victim = max(files, key=os.path.getsize)  # the biggest data file of the latest step
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    truncated = open(victim, "rb").read()
    trainer = _trainer(tmp_path, {"data": 1}, jax.devices()[:1])
    ckpt = Checkpointer(str(ckpt_dir))
    state, meta = ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    assert meta["step"] == STEPS - 2 and int(state["step"]) == STEPS - 2
    assert ckpt.bad == {STEPS} and ckpt.latest_step() == STEPS  # skipped in place
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # nothing moved aside
    ckpt.close()
    assert open(victim, "rb").read() == truncated


def test_restore_onto_a_different_mesh_reshards(uninterrupted):
    ckpt = Checkpointer(os.path.join(uninterrupted, "checkpoints"))
    got = []
    for shape in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1}):
        devices = None if len(shape) > 1 else jax.devices()[:1]
        trainer = _trainer(uninterrupted, shape, devices)
        state, meta = ckpt.restore(trainer.abstract_state, trainer.state_shardings)
        assert meta["step"] == STEPS
        leaf = jax.tree.leaves(state["params"])[0]
        assert leaf.sharding.mesh.shape == trainer.mesh.shape
        got.append(jax.tree.map(np.asarray, state))
    ckpt.close()
    for x, y in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1]), strict=True):
        assert np.array_equal(x, y)
