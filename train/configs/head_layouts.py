"""Every head-layout kind of issue 15 in one model (``head-layouts-tiny``: MoH, SSA, KDGQA,
DGQA, PGQA, Sigma DiffQKV, CCGQA and LAMA, one per layer) on the built-in stdlib-docstring
corpus; MoH's load-balance loss enters the objective with ``aux_loss_weight`` and is logged as
``aux_loss``.

Command line:
    python -m train.pretrain --config train/configs/head_layouts.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="head-layouts-tiny",
    model="head-layouts-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
    aux_loss_weight=0.01,
)
