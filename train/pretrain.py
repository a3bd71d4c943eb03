"""Pretraining entry point: ``python -m train.pretrain [--config FILE] [--set key=value ...]``.

With no arguments it trains the tiny MLA model ("mla-tiny-default") on the built-in corpus
for a few CPU minutes, evaluates, checkpoints, samples a few lines and prints where its
outputs are (``./runs/<name>/``). A notebook calls :func:`run` with a config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import os

import jax
import jax.numpy as jnp
from flax import nnx

from train.cli import guarded
from train.config import ConfigError, TrainConfig, config_from_argv
from train.loop import RunResult, host_params, say, setup_distributed, train_loop
from train.metrics import plot_losses
from train.platform import configure_cpu

__all__ = ["build_model", "remat_blocks", "run", "finish", "main"]


def _parse_overrides(model_config, overrides) -> dict:
    """``("field=value", ...)`` -> kwargs; values are Python literals, else strings.

    Raises:
      ConfigError: an entry without ``=``, an unknown field (with close matches) or a field
        given twice.
    """
    known = [f.name for f in dataclasses.fields(model_config) if f.init]
    kind = type(model_config).__name__
    kwargs = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"model_overrides entry {item!r} must look like field=value")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {close}?" if close else f"fields: {sorted(known)}"
            raise ConfigError(f"model_overrides: {kind} has no field {key!r}; {hint}")
        if key in kwargs:
            raise ConfigError(f"model_overrides sets {key!r} twice")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


_REMAT_CLASSES: dict[type, type] = {}


def _remat_call(cls: type):
    """``cls.__call__`` under ``nnx.remat`` (keyword arguments passed positionally, since
    ``nnx.remat`` cannot bind keyword-only parameters)."""

    def call(self, x, *args, **kwargs):
        names = tuple(sorted(kwargs))
        n = len(args)

        def body(module, x, *values):
            named = dict(zip(names, values[n:], strict=True))
            return cls.__call__(module, x, *values[:n], **named)

        return nnx.remat(body)(self, x, *args, *(kwargs[k] for k in names))

    return call


def remat_blocks(model: nnx.Module) -> nnx.Module:
    """Rematerialise each block of ``model.layers`` (``nnx.remat`` on the block's call).

    Each block's class is swapped for a cached subclass whose ``__call__`` is wrapped in
    ``nnx.remat``: parameters and paths are unchanged, activations inside a block are
    recomputed in the backward pass instead of stored.

    Raises:
      ConfigError: the model has no non-empty ``layers`` list.
    """
    blocks = getattr(model, "layers", None)
    if not blocks or not all(isinstance(b, nnx.Module) for b in blocks):
        raise ConfigError(f"{type(model).__name__} has no `layers` list of blocks; use remat=full")
    for block in blocks:
        cls = type(block)
        if cls not in _REMAT_CLASSES.values():
            if cls not in _REMAT_CLASSES:
                _REMAT_CLASSES[cls] = type(
                    f"Remat{cls.__name__}", (cls,), {"__call__": _remat_call(cls)}
                )
            block.__class__ = _REMAT_CLASSES[cls]
    return model


def build_model(config: TrainConfig, model_config=None):
    """The model config and a zero-argument constructor of ``models.DecoderLM`` for ``config``.

    Args:
      config: the training config: ``model`` names a registered model config,
        ``model_overrides`` changes its fields, ``compute_dtype`` sets the model's compute
        dtype (parameters stay fp32), ``remat=blocks`` rematerialises each block.
      model_config: a ``models.ModelConfig`` to use instead of the named one.

    Returns:
      ``(model_config, model_fn)``.

    Raises:
      ConfigError: an unknown model name or override.
    """
    from models import DecoderLM, get_config, list_configs

    if model_config is None:
        if config.model not in list_configs():
            raise ConfigError(f"model={config.model!r} is not one of {list_configs()}")
        model_config = get_config(config.model)
    changes = _parse_overrides(model_config, config.model_overrides)
    if config.compute_dtype != "float32" and "dtype" not in changes:
        changes["dtype"] = jnp.dtype(config.compute_dtype)
    try:
        model_config = dataclasses.replace(model_config, **changes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model_overrides={','.join(config.model_overrides)}: {err}") from None

    def model_fn():
        model = DecoderLM(model_config, rngs=nnx.Rngs(config.seed))
        return remat_blocks(model) if config.remat == "blocks" else model

    return model_config, model_fn


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
        png = os.path.abspath(os.path.join(result.run_dir, "loss.png"))
        outputs["plot"] = plot_losses(outputs["metrics"], png)
    if config.sample_tokens > 0 and config.sample_prompts and config.data != "recall":
        model = result.trainer.model(host_params(result.state["params"]), result.rest)
        texts = sample_texts(
            model,
            list(config.sample_prompts),
            max_new_tokens=config.sample_tokens,
            seed=config.seed,
            temperature=0.7,
            top_k=20,
        )
        say("samples (temperature 0.7, top-k 20, KV cache):")
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
    if config.init_from:
        raise ConfigError(
            f"init_from={config.init_from!r} is read by train.finetune; train.pretrain starts "
            "from a fresh initialisation (drop init_from, or run python -m train.finetune)"
        )
    if config.adapter:
        raise ConfigError(
            f"adapter={config.adapter!r} is attached by train.finetune to a trained base; "
            "train.pretrain trains every parameter from scratch"
        )
    setup_distributed(config)
    if model_fn is None:
        model_config, model_fn = build_model(config, model_config)
    result = train_loop(config, model_fn, model_config=model_config)
    finish(result, config)
    return result


def main(argv=None) -> None:
    """Command-line entry point (errors: see ``train.cli``)."""
    configure_cpu()  # before any JAX computation: XLA reads its flags once
    guarded(lambda: run(config_from_argv(argv, __doc__.splitlines()[0], prog=_PROG)))


_PROG = "python -m train.pretrain"


if __name__ == "__main__":
    main()
