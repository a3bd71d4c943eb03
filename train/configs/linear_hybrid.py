"""A hybrid of gated-delta-rule linear attention and GQA softmax layers (``linear-hybrid-tiny``)
on the built-in stdlib-docstring corpus; the linear layers decode with a fixed-size state.

Command line:
    python -m train.pretrain --config train/configs/linear_hybrid.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="linear-hybrid-tiny",
    model="linear-hybrid-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
)
