"""Compressed convolutional GQA (``ccgqa-tiny``: llama-tiny's layers as CCGQA, attention in a
latent 2x narrower, 4 query heads over 2 kv heads) on the built-in stdlib-docstring corpus.

Command line:
    python -m train.pretrain --config train/configs/ccgqa.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="ccgqa-tiny",
    model="ccgqa-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
)
