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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.cli import guarded
from train.config import ConfigError, TrainConfig, config_from_argv
from train.loop import RunResult, host_params, say, setup_distributed, train_loop
from train.platform import configure_cpu
from train.pretrain import build_model, finish

__all__ = ["is_hf_dir", "load_init", "start_params", "Start", "run", "main"]


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
    return model.config, _host(model)


def run(config: TrainConfig, *, extend=None) -> RunResult:
    """Finetune under ``config`` from ``config.init_from`` (resuming its own run if present).

    Args:
      config: the training config (``init_from``, ``optimizer`` rules, ...).
      extend: optional ``extend(model)`` that changes each freshly built model in place
        before training, e.g. ``lambda m: jaxattn.lowrank.attach(m, "attn/q$", make)``; the
        adapter leaves it adds start fresh, every base leaf must still be there with its shape.

    An ``--adapter`` method with train-loop callbacks (``train.adapter_procedures``: LoRA-SB,
    LoKU, LoRAM, PiSSA / OLoRA inits) has them run here: see :func:`start_params`, the
    method's training loss in every step, and its ``finish`` before the adapter is saved.

    Returns:
      The :class:`train.loop.RunResult`.
    """
    from train.adapters import adapter_config, adapter_rules

    if adapter_config(config) is not None:  # validated before anything is loaded
        config = dataclasses.replace(config, optimizer=adapter_rules(config))
    setup_distributed(config)
    start = start_params(config)
    model_fn = _model_fn(config, start.model_config, extend)
    result = train_loop(
        config,
        model_fn,
        model_config=start.model_config,
        init_params=start.params,
        train_loss=start.callbacks.train_loss,
    )
    finish(result, config)
    if config.adapter and jax.process_index() == 0:
        _save_adapter(result, config, start)
    return result


@dataclasses.dataclass
class Start:
    """Where a fine-tuning run starts: the model config it trains, its host parameters (base
    leaves, and the adapter leaves a ``prepare`` callback initialised), the method's
    callbacks and what ``shrink`` handed on to ``finish``."""

    model_config: object
    params: dict
    callbacks: object
    method: object = None
    token: object = None


def _model_fn(config, model_config, extend=None):
    """The run's model constructor: ``model_config`` with the config's overrides, then
    ``extend`` and the ``--adapter`` attached."""
    from train.adapters import attach_adapter

    _, base_fn = build_model(config, model_config)
    if extend is None and not config.adapter:
        return base_fn

    def model_fn():
        model = base_fn()
        if extend is not None:
            extend(model)
        if config.adapter:
            attach_adapter(model, config)
        return model

    return model_fn


def _host(model) -> dict:
    """The model's parameters as a pure dict of host (numpy) arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def start_params(config: TrainConfig) -> Start:
    """Load ``init_from`` and run the ``--adapter`` method's start callbacks, deterministically
    (a resumed run and ``train.sample`` call this again and compare the base digest):

    1. ``shrink`` (LoRAM): the model to train is made from the loaded one (its config and
       parameters replace the loaded ones);
    2. ``prepare`` (LoRA-SB, LoKU, PiSSA / OLoRA): the model with the base and a fresh adapter,
       initialised from the base and the run's first training batches; its parameters
       (adapter leaves, and base leaves it rewrote) are where the run starts.

    Raises:
      ConfigError: see :func:`load_init` and the callbacks.
    """
    from jaxattn import lowrank
    from train.adapter_procedures import LoopCallbacks, callbacks_for
    from train.adapters import adapter_config
    from train.data import make_loaders

    model_config, params = load_init(config.init_from)
    cfg = adapter_config(config)
    method = None if cfg is None else lowrank.make_method(cfg.method, **cfg.options)
    callbacks = LoopCallbacks() if method is None else callbacks_for(method)
    token = None
    if callbacks.shrink is not None:
        from models import DecoderLM

        full = DecoderLM(model_config, rngs=nnx.Rngs(0))
        nnx.update(full, jax.tree.map(jnp.asarray, params))
        small, token = callbacks.shrink(full, method, config)
        model_config, params = small.config, _host(small)
    if callbacks.prepare is not None:
        model = _model_fn(config, model_config)()
        nnx.update(model, jax.tree.map(jnp.asarray, params))
        loader = make_loaders(config, jax.process_index(), jax.process_count())[0]
        batches = [loader.batch(i) for i in range(callbacks.batches(method))]
        callbacks.prepare(model, batches, method, config)
        params = _host(model)
    return Start(model_config, params, callbacks, method, token)


def _save_adapter(result: RunResult, config: TrainConfig, start: Start) -> str:
    """Write the trained adapter alone (``lowrank.save``) to ``<run_dir>/adapter`` (after the
    method's ``finish`` callback, e.g. LoRAM's recovery onto the original model)."""
    from jaxattn import lowrank
    from train.adapters import adapter_config

    model = result.trainer.model(host_params(result.state["params"]), result.rest)
    if start.callbacks.finish is not None:
        model = start.callbacks.finish(model, start.token, start.method, config)
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
