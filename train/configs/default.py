"""The default CPU demo: tiny MLA model on the built-in stdlib-docstring corpus.

Command line (identical to running with no arguments):
    python -m train.pretrain --config train/configs/default.py
"""

from train.config import TrainConfig

CONFIG = TrainConfig()
