"""Low-rank factorised compact MHSA (``lowrank-mhsa-tiny``: LAMA's rank-16 affinity against each
position's causal context vector, 4 heads) on the built-in stdlib-docstring corpus.

Command line:
    python -m train.pretrain --config train/configs/lowrank_mhsa.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="lowrank-mhsa-tiny",
    model="lowrank-mhsa-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
)
