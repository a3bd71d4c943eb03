"""Associative recall on a 2-layer, 8-head Llama (MHA) that trains on a 2-core CPU in minutes.

The test model of the attention-head tools (``jaxattn.heads``) and of the KV-cache issues.
Rows are ``train.data.RecallLoader``'s ``k1 v1 .. k4 v4 q1 a1 .. q4 a4``: four key-value
pairs, then queries whose answer is the value paired with the key. Layer 0 has a 2-token
sliding window (each token sees itself and its predecessor). Measured on this CPU: with 8 pairs
(seq_len 32) the same model stayed near chance (eval loss ~ln 8) for 3000 steps with the window
and 8000 without; with 16 pairs (seq_len 64, d_model 128) ~ln 16 after 2000 steps.
The committed weights (``train/weights/heads_recall``, loaded by
``train.trained.load_trained("heads-recall")``) come from exactly:

    python -m train.pretrain --config train/configs/heads_recall.py
    python -m train.trained export heads-recall runs/heads-recall
"""

from train.config import TrainConfig

CONFIG = TrainConfig(
    name="heads-recall",
    model="llama-tiny",
    model_overrides=(
        "num_layers=2",
        "num_heads=8",
        "num_kv_heads=8",
        "d_model=64",
        "mlp_dim=128",
        "max_seq_len=64",
        "head_dim=16",
        "rope=None",  # RopeConfig(): theta 10000
        "sliding_window=2",
        "sliding_window_layers=(0,)",
    ),
    data="recall",
    seq_len=16,
    batch_size=64,
    steps=3000,
    warmup_steps=100,
    lr=3e-3,
    weight_decay=0.0,
    eval_every=500,
    eval_batches=4,
    ckpt_every=1000,
    steps_per_call=50,
    sample_tokens=0,
    tensorboard=False,
)
