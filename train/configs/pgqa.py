"""Perturbed GQA (``pgqa-tiny``: llama-tiny with 8 query heads in uniform groups over 2 kv
heads, a noise with each head output's mean and std subtracted in training) on the built-in
stdlib-docstring corpus.

Command line:
    python -m train.pretrain --config train/configs/pgqa.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="pgqa-tiny",
    model="pgqa-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
)
