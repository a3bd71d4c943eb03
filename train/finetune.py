"""Finetuning entry point: ``python -m train.finetune --config train/configs/finetune_tiny.py``.

Starts from ``init_from``: a jaxattn run directory (or its ``checkpoints/``; the newest step's
parameters and stored model config are used) or a Hugging Face checkpoint directory
(``config.json`` + ``*.safetensors``, read by ``models.from_hf``). Which parameters train is
set by the ``optimizer`` path rules (``"frozen:^embed/"``, ..., ``"adamw:.*"``; see
``train.optim``); frozen ones keep their values exactly, get no gradient and carry no
optimizer state. The run itself (data, checkpoints, resume,
logs) is the same loop as pretraining, writing to its own run directory.

The model may hold adapter leaves (``jaxattn.layers.AdapterParam``) the base lacks, attached
via ``run(config, extend=...)``: every base leaf must be in the model with its shape and dtype,
the adapters start fresh, and any other leaf the base lacks is an error (a model override that
adds a layer is a mistake, not a fine-tune). Checkpoints
of a fine-tuning run hold every leaf but the frozen base ones, plus a reference to the base
(``meta["base"]``: ``init_from`` and a digest of its leaves); resuming reloads ``init_from``
and refuses a base whose digest differs, and ``train.sample`` follows the reference.

The starting checkpoint is verified like every read (``train.checkpoints.restore_params``): a
corrupted one stops with ``checkpoint error:`` naming the step directory and parameters, and a
missing, empty or non-run ``init_from`` with ``config error:``, before anything is created.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from train.cli import guarded
from train.config import ConfigError, TrainConfig, config_from_argv
from train.loop import RunResult, host_params, say, setup_distributed, train_loop
from train.platform import configure_cpu
from train.pretrain import build_model, finish

__all__ = ["is_hf_dir", "load_init", "run", "main"]


def is_hf_dir(path: str) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint directory (config.json + safetensors)."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and any(name.endswith(".safetensors") for name in os.listdir(path))
    )


def load_init(source: str):
    """The model config and host parameters (pure dict of numpy arrays) to start from.

    Args:
      source: a jaxattn run / checkpoint directory, or a Hugging Face checkpoint directory.

    Raises:
      ConfigError: an empty, missing or unusable ``source`` (naming ``init_from``).
      CheckpointError: a jaxattn checkpoint that fails its integrity check.
    """
    from train.sample import load_model, resolve_checkpoint

    if not source:
        raise ConfigError("finetuning needs init_from=<jaxattn run dir or Hugging Face dir>")
    if not os.path.isdir(source):
        what = "does not exist" if not os.path.exists(source) else "is not a directory"
        raise ConfigError(f"init_from={source!r} {what}")
    if is_hf_dir(source):
        from models import from_hf

        try:
            model = from_hf(source)
        except (ValueError, KeyError, OSError) as err:
            raise ConfigError(f"init_from={source!r} (Hugging Face directory): {err}") from None
    else:
        model, _ = load_model(resolve_checkpoint(source, flag="init_from"))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return model.config, jax.tree.map(np.asarray, params)


def run(config: TrainConfig, *, extend=None) -> RunResult:
    """Finetune under ``config`` from ``config.init_from`` (resuming its own run if present).

    Args:
      config: the training config (``init_from``, ``optimizer`` rules, ...).
      extend: optional ``extend(model)`` that changes each freshly built model in place
        before training, e.g. ``lambda m: jaxattn.lowrank.attach(m, "attn/q$", make)``; the
        adapter leaves it adds start fresh, every base leaf must still be there with its shape.

    Returns:
      The :class:`train.loop.RunResult`.
    """
    from train.adapters import adapter_config, adapter_rules

    if adapter_config(config) is not None:  # validated before anything is loaded
        config = dataclasses.replace(config, optimizer=adapter_rules(config))
    setup_distributed(config)
    model_config, params = load_init(config.init_from)
    model_config, model_fn = build_model(config, model_config)
    extensions = [e for e in (extend, config.adapter and _adapter_extension(config)) if e]
    if extensions:
        base_fn = model_fn

        def model_fn():
            model = base_fn()
            for ext in extensions:
                ext(model)
            return model

    result = train_loop(config, model_fn, model_config=model_config, init_params=params)
    finish(result, config)
    if config.adapter and jax.process_index() == 0:
        _save_adapter(result, config)
    return result


def _adapter_extension(config: TrainConfig):
    from train.adapters import attach_adapter

    return lambda model: attach_adapter(model, config)


def _save_adapter(result: RunResult, config: TrainConfig) -> str:
    """Write the trained adapter alone (``lowrank.save``) to ``<run_dir>/adapter``."""
    from jaxattn import lowrank
    from train.adapters import adapter_config

    model = result.trainer.model(host_params(result.state["params"]), result.rest)
    out = os.path.join(result.run_dir, "adapter")
    lowrank.save(model, out, adapter_config(config).name)
    say(f"  {'adapter':12s} {os.path.abspath(out)}")
    return out


def main(argv=None) -> None:
    """Command-line entry point (errors: see ``train.cli``)."""
    configure_cpu()  # before any JAX computation: XLA reads its flags once
    prog = "python -m train.finetune"
    guarded(lambda: run(config_from_argv(argv, __doc__.splitlines()[0], prog=prog)))


if __name__ == "__main__":
    main()
