"""train/configs/linear_hybrid.py trains through ``python -m train.pretrain --config ...``: a
hybrid of "linear" (gated delta rule, recurrent-state cache) and softmax layers, 20 steps in
two runs, the second resumed from the first's checkpoint at step 10; the loss falls. (Two of
the config's four layers, one of each kind, to keep compiles short; sampling through the caches
is ``tests/jaxattn/layers/test_linear_attention_layer.py``'s generate test.)"""

from __future__ import annotations

import json

import pytest
from train_testlib import as_set_args

SMALL = dict(
    seq_len=32, batch_size=8, warmup_steps=2, ckpt_every=5, log_every=5, steps_per_call=5,
    eval_every=1000, eval_batches=2, tensorboard=False, plot=False, async_checkpoint=False,
    sample_tokens=0, model_overrides=("num_layers=2",),
)  # fmt: skip


# slow tier: an end-to-end CLI run (two training subprocesses). The default run covers its
# paths: the pretrain / checkpoint / resume loop in tests/train/test_checkpoints.py, the hybrid
# config's model, decode and generate in tests/jaxattn/layers/test_linear_attention_layer.py
# (including test_hybrid_gradients_reach_every_linear_layer_parameter), the op's gradients in
# tests/jaxattn/ops/test_linear_attention.py.
@pytest.mark.slow
def test_linear_hybrid_config_trains_checkpoints_and_resumes(zygote, tmp_path):
    run = tmp_path / "run"
    argv = ["--config", "train/configs/linear_hybrid.py"]
    first = SMALL | {"run_dir": str(run), "steps": 10}
    code, out = zygote.run(argv + as_set_args(first), tmp_path / "first.log")
    assert code == 0, out[-3000:]
    assert "linear-hybrid-tiny" in out
    second = first | {"steps": 20}
    code, out = zygote.run(argv + as_set_args(second), tmp_path / "second.log")
    assert code == 0, out[-3000:]
    assert "resumed at step 10" in out, out[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}
    assert set(train) >= {5, 10, 15, 20} and train[20] < train[5], train
