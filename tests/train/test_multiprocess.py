"""Two local processes joined by ``jax.distributed.initialize`` (CPU, gloo collectives, 2 fake
devices each) train the same as one process with 4 devices and the same global batch."""

from __future__ import annotations

import os
import subprocess

import jax
import numpy as np
from train_testlib import REPO, cli_env, free_port, pretrain_cmd, run_ok, tiny_config

from jaxattn.sharding import make_mesh
from train.checkpoints import restore_params
from train.pretrain import build_model
from train.step import make_trainer

STEPS = 4
MESH = dict(mesh_data=2, mesh_fsdp=2, steps=STEPS, ckpt_every=STEPS)


def _params(run_dir):
    config = tiny_config(run_dir, steps=STEPS)
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh({"data": 1}, jax.devices()[:1]))
    params, meta = restore_params(
        os.path.join(run_dir, "checkpoints"), trainer.abstract_state["params"]
    )
    assert meta["step"] == STEPS
    return jax.tree.map(np.asarray, params)


def test_two_processes_train_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    port = free_port()
    procs = []
    for pid in range(2):
        cmd = pretrain_cmd(
            two,
            distributed=True,
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=2,
            process_id=pid,
            **MESH,
        )
        procs.append(
            subprocess.Popen(
                cmd,
                env=cli_env(2),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    out_single = run_ok(pretrain_cmd(one, **MESH), cli_env(4))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    # process 0 alone logs; both saw 2 processes and 4 global devices
    assert f"step {STEPS:>6}/" in outs[0] and f"step {STEPS:>6}/" not in outs[1]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in outs[0]
    loss = lambda out: float(out.split(f"step {STEPS:>6}/{STEPS}  loss")[1].split()[0])
    assert abs(loss(outs[0]) - loss(out_single)) < 1e-4
    a, b = _params(one), _params(two)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
