"""train/configs/moh.py and ssa.py train through ``python -m train.pretrain --config ...``: 5
steps of each (one layer, short sequences), metrics written; MoH's router reports its
load-balance loss as ``aux_loss`` (the train step's auxiliary-loss seam), SSA sows none."""

from __future__ import annotations

import json
import math

import pytest
from train_testlib import as_set_args

SMALL = dict(
    seq_len=16, batch_size=4, steps=5, warmup_steps=1, ckpt_every=5, log_every=5,
    steps_per_call=5, eval_every=1000, eval_batches=1, tensorboard=False, plot=False,
    async_checkpoint=False, sample_tokens=0, model_overrides=("num_layers=1",),
)  # fmt: skip


@pytest.mark.parametrize("kind", ["moh", "ssa"])
def test_head_kind_config_trains(zygote, tmp_path, kind):
    run = tmp_path / "run"
    argv = ["--config", f"train/configs/{kind}.py"]
    code, out = zygote.run(argv + as_set_args(SMALL | {"run_dir": str(run)}), tmp_path / "log")
    assert code == 0, out[-3000:]
    assert f"{kind}-tiny" in out
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r for r in rows if r.get("split") == "train"]
    assert train and train[-1]["step"] == 5 and math.isfinite(train[-1]["loss"]), train
    if kind == "moh":  # E² · mean(P · f), = k = 3 at perfectly balanced routing
        assert 0.0 < train[-1]["aux_loss"] < 6 * 6, train
    else:
        assert "aux_loss" not in train[-1], train
