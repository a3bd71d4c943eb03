"""Fixtures shared by the train tests: one pre-imported process forking the CLI runs, and a
finished tiny run to copy."""

from __future__ import annotations

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
def tiny_run(zygote, tmp_path_factory):
    """Run directory of a finished ``TINY_RUN`` of 4 steps (copy it before changing it)."""
    root = tmp_path_factory.mktemp("tiny_run")
    code, out = zygote.run(set_args(TINY_STEPS | {"run_dir": str(root / "run")}), root / "log")
    assert code == 0, out[-3000:]
    return root / "run"
