"""Mixture-of-head attention (``moh-tiny``: 2 shared + top-3 of 6 routed heads per token) on the
built-in stdlib-docstring corpus; the router's load-balance loss enters the objective with
``aux_loss_weight`` and is logged as ``aux_loss``.

Command line:
    python -m train.pretrain --config train/configs/moh.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="moh-tiny",
    model="moh-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
    aux_loss_weight=0.01,
)
