"""Fixtures shared by the train tests: one pre-imported process forking the CLI runs, and a
finished tiny run to copy."""

from __future__ import annotations

import fcntl

import pytest
from train_testlib import Zygote, cli_env, set_args

# the tiny run every fixture user copies: 4 steps, checkpoints at 2 and 4
TINY_STEPS = dict(steps=4, warmup_steps=1, ckpt_every=2, log_every=1)


@pytest.fixture(scope="session")
def zygote():
    """A :class:`train_testlib.Zygote` on one fake CPU device (compilation cache shared by
    every run of this test process)."""
    with Zygote(cli_env(1)) as z:
        yield z


@pytest.fixture(scope="session")
def tiny_run(request, tmp_path_factory, worker_id):
    """Run directory of a finished ``TINY_RUN`` of 4 steps, made once per pytest session
    (shared by the xdist workers; never change it: copy it first)."""
    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # the session's, all workers'
    run = root / "tiny_run" / "run"
    with open(root / "tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker makes it, the others wait for it
        if not (run / "checkpoints" / "4").is_dir():
            run.parent.mkdir(exist_ok=True)
            zygote = request.getfixturevalue("zygote")
            code, out = zygote.run(set_args(TINY_STEPS | {"run_dir": str(run)}), run.parent / "log")
            assert code == 0, out[-3000:]
    return run
