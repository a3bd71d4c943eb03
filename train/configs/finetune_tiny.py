"""Finetune the default run's model with the embedding and the first block frozen.

Run the default pretraining first (it writes runs/mla-tiny-default), then:
    python -m train.finetune --config train/configs/finetune_tiny.py
A Hugging Face checkpoint directory works too:
    python -m train.finetune --config train/configs/finetune_tiny.py --set init_from=/path/to/hf
Other optimizers by path (first match wins; see train.optim, train.optimizers):
    python -m train.finetune --config train/configs/finetune_tiny.py \
        --set "optimizer=frozen:^embed/,galore(rank=16,update_proj_gap=50):/mlp/,adamw:.*"
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="mla-tiny-finetune",
    init_from="runs/mla-tiny-default",
    optimizer=(r"frozen:^embed/", r"frozen:^layers/0/", "adamw:.*"),
    steps=60,
    warmup_steps=6,
    lr=5e-4,
    eval_every=30,
    ckpt_every=30,
    log_every=10,
)
