"""Training entry points and their logic (importable, so notebooks call the same functions).

Entry points
  python -m train.pretrain    train from scratch (no arguments: the CPU demo run)
  python -m train.finetune    start from a jaxattn or Hugging Face checkpoint
  python -m train.sample      generate text from a checkpoint (KV cache)
Modules
  config        TrainConfig, config files under train/configs, --set overrides, --help keys
  data          byte tokenizer, built-in corpus, associative recall, resumable loaders
  step          sharded train state, jitted train/eval steps (non-finite skip inside)
  optim         optimizers by ordered path rules over named factories; trainable split
  optimizers    the built-in factories: adamw, lion, sgd, frozen, galore, fira
  checkpoints   Orbax CheckpointManager: verified restores, bad steps skipped in place
  integrity     per-leaf checksums, verification naming the bad leaves
  resume        what a start finds in run_dir: fresh, continue, refuse, overwrite
  setup         validation of a run before anything is created on disk
  metrics       append-only JSONL/TensorBoard, FLOPs and MFU, loss plot
  loop          the training loop shared by pretrain and finetune (non-finite stop)
  cli           one-line errors and exit codes of the entry points
"""
