"""A multi-host example: 4-way FSDP x 2-way tensor parallelism per data replica, bf16 compute,
per-block rematerialisation, gradient accumulation; one process per host.

Command line (on every host of a TPU pod slice; JAX finds the coordinator itself):
    python -m train.pretrain --config train/configs/pod_example.py --set data=/data/tokens.npy
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="mla-tiny-pod",
    seq_len=1024,
    batch_size=256,
    grad_accum=2,
    steps=10_000,
    warmup_steps=500,
    lr=1e-3,
    compute_dtype="bfloat16",
    remat="blocks",
    mesh_data=-1,
    mesh_fsdp=4,
    mesh_tensor=2,
    distributed=True,
    eval_every=500,
    ckpt_every=500,
    log_every=50,
    sample_tokens=0,
)
