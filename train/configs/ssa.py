"""Selective self-attention (``ssa-tiny``: llama-tiny with SSA's query, position and value
temperatures) on the built-in stdlib-docstring corpus.

Command line:
    python -m train.pretrain --config train/configs/ssa.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="ssa-tiny",
    model="ssa-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
)
