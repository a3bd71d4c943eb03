"""Pretraining entry point: ``python -m train.pretrain [--config FILE] [--set key=value ...]``.

With no arguments it trains the tiny MLA model ("mla-tiny-default") on the built-in corpus
for a few CPU minutes, evaluates, checkpoints, samples a few lines and prints where its
outputs are (``./runs/<name>/``). A notebook calls :func:`run` with a config.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
from flax import nnx

from train.config import ConfigError, TrainConfig, config_from_argv
from train.loop import RunResult, host_params, say, setup_distributed, train_loop
from train.metrics import plot_losses

__all__ = ["build_model", "run", "finish", "main"]


def build_model(config: TrainConfig, model_config=None):
    """The model config and a zero-argument constructor of ``models.DecoderLM`` for ``config``.

    Args:
      config: the training config (``model`` names a registered model config; ``remat=blocks``
        turns on the model's own per-block rematerialisation).
      model_config: a ``models.ModelConfig`` to use instead of the named one.

    Returns:
      ``(model_config, model_fn)``.

    Raises:
      ConfigError: an unknown model name, or ``remat=blocks`` for a model without block remat.
    """
    from models import DecoderLM, get_config, list_configs

    if model_config is None:
        if config.model not in list_configs():
            raise ConfigError(f"model={config.model!r} is not one of {list_configs()}")
        model_config = get_config(config.model)
    if config.remat == "blocks":
        if not any(f.name == "remat" for f in dataclasses.fields(model_config)):
            raise ConfigError(f"model {config.model!r} has no per-block remat; use remat=full")
        model_config = dataclasses.replace(model_config, remat=True)
    return model_config, lambda: DecoderLM(model_config, rngs=nnx.Rngs(config.seed))


def finish(result: RunResult, config: TrainConfig) -> dict:
    """After training: loss plot, a few samples, and a summary of where the outputs are."""
    from train.sample import sample_texts

    outputs = {
        "run_dir": os.path.abspath(result.run_dir),
        "checkpoints": os.path.abspath(os.path.join(result.run_dir, "checkpoints")),
        "metrics": os.path.abspath(os.path.join(result.run_dir, "metrics.jsonl")),
    }
    if config.tensorboard:
        outputs["tensorboard"] = os.path.abspath(os.path.join(result.run_dir, "tensorboard"))
    if config.plot and jax.process_index() == 0 and os.path.exists(outputs["metrics"]):
        outputs["plot"] = plot_losses(outputs["metrics"], os.path.join(result.run_dir, "loss.png"))
    if config.sample_tokens > 0 and config.sample_prompts and config.data != "recall":
        model = result.trainer.model(host_params(result.state["params"]), result.rest)
        texts = sample_texts(
            model,
            list(config.sample_prompts),
            max_new_tokens=config.sample_tokens,
            seed=config.seed,
        )
        say("samples (greedy, KV cache):")
        for prompt, text in zip(config.sample_prompts, texts, strict=True):
            say(f"  {prompt!r} -> {text!r}")
    say(f"done in {result.seconds:.0f}s; final eval loss {result.eval_loss:.4f}")
    for name, path in outputs.items():
        say(f"  {name:12s} {path}")
    return outputs


def run(config: TrainConfig, *, model_fn=None, model_config=None) -> RunResult:
    """Pretrain under ``config`` (multi-host setup, training, plot, samples).

    Args:
      config: the training config.
      model_fn: a zero-argument model constructor overriding ``config.model`` (tests,
        notebooks with their own modules).
      model_config: the model's config (FLOP estimate, checkpoint metadata).

    Returns:
      The :class:`train.loop.RunResult`.
    """
    setup_distributed(config)
    if model_fn is None:
        model_config, model_fn = build_model(config, model_config)
    result = train_loop(config, model_fn, model_config=model_config)
    finish(result, config)
    return result


def main(argv=None) -> None:
    """Command-line entry point."""
    try:
        config = config_from_argv(argv, description=__doc__.splitlines()[0])
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    run(config)


if __name__ == "__main__":
    main()
