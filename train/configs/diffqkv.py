"""Sigma DiffQKV (``diffqkv-tiny``: 8 query heads, 2 key heads of dim 8, 4 value heads of dim
16, augmented Q of dim 16) on the built-in stdlib-docstring corpus.

Command line:
    python -m train.pretrain --config train/configs/diffqkv.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="diffqkv-tiny",
    model="diffqkv-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
)
