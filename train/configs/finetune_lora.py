"""LoRA-finetune the default run's model: rank 8 on every projection but the LM head.

Run the default pretraining first (it writes runs/mla-tiny-default), then:
    python -m train.finetune --config train/configs/finetune_lora.py
The same from the command line, with other fields (train.adapters):
    python -m train.finetune --config train/configs/finetune_tiny.py --adapter lora \
        --set adapter.rank=8 --set "adapter.targets=attn/(q|o)$|mlp/"
Only the adapter trains (rules adamw:/adapter/, frozen:.*); checkpoints hold the adapter alone
and the end of the run writes it to runs/mla-tiny-lora/adapter (lowrank.save), which
    python -m train.sample --checkpoint runs/mla-tiny-default --adapter runs/mla-tiny-lora/adapter \
        --prompt "def "
attaches to the base. Any registered method works the same way (--adapter dylora, ...).
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="mla-tiny-lora",
    init_from="runs/mla-tiny-default",
    adapter="lora",
    adapter_options=("rank=8", "alpha=16", "targets=all-linear"),
    steps=60,
    warmup_steps=6,
    lr=3e-3,
    eval_every=30,
    ckpt_every=30,
    log_every=10,
)
