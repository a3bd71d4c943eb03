"""Dynamic GQA (``dgqa-tiny``: llama-tiny with 8 query heads split among 2 kv heads by a
key-norm EMA, a non-parameter state) on the built-in stdlib-docstring corpus. train.step
carries the EMA from step to step (``state["stats"]``) and checkpoints it; see
jaxattn/layers/_kdgqa.py.

Command line:
    python -m train.pretrain --config train/configs/dgqa.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="dgqa-tiny",
    model="dgqa-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
)
