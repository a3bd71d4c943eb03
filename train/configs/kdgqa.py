"""Key-driven GQA (``kdgqa-tiny``: llama-tiny with 8 query heads split among 2 kv heads by
each token's key-head norms) on the built-in stdlib-docstring corpus.

Command line:
    python -m train.pretrain --config train/configs/kdgqa.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="kdgqa-tiny",
    model="kdgqa-tiny",
    seq_len=128,
    batch_size=16,
    steps=120,
    warmup_steps=12,
    lr=2e-3,
)
