"""Training entry points and their logic (importable, so notebooks call the same functions).

Entry points
  python -m train.pretrain    train from scratch (no arguments: the CPU demo run)
  python -m train.finetune    start from a jaxattn or Hugging Face checkpoint
  python -m train.sample      generate text from a checkpoint (KV cache)
Modules
  config        TrainConfig, config files under train/configs, --set overrides
  data          byte tokenizer, built-in corpus, associative recall, resumable loaders
  step          sharded train state, jitted train/eval steps
  optim         AdamW + warmup/cosine, clipping, trainable/frozen path patterns
  checkpoints   Orbax CheckpointManager with verified restores
  metrics       JSONL/TensorBoard, FLOPs and MFU, loss plot
  loop          the training loop shared by pretrain and finetune
"""
