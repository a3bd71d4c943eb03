"""Synthetic associative recall with the tiny MLA model (loss counts only the answers).

Command line:
    python -m train.pretrain --config train/configs/recall.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="mla-tiny-recall",
    data="recall",
    seq_len=128,
    batch_size=32,
    steps=300,
    warmup_steps=30,
    lr=3e-3,
    eval_every=100,
    sample_tokens=0,
)
