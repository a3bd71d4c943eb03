"""What a run needs before its first step, validated without touching the disk.

:func:`prepare` checks, in order: the mesh against the devices, the batch against the mesh,
the model (built, and its forward pass traced on one batch, so errors a model raises only
when called surface before anything exists), the optimizer's path patterns, the data
(exists, is integer token ids inside the vocabulary, holds one batch and one held-out
window), ``init_params`` against the model (each of its leaves must be in the model with its
shape and dtype; the model's adapter leaves, ``AdapterParam``, it lacks start fresh, any
other leaf it lacks is an error), and the run directory
(:func:`train.resume.plan_run`). Each failure is a :class:`train.config.ConfigError` naming
the config field and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from jaxattn.sharding import logical_to_spec, make_mesh
from train.config import ConfigError
from train.data import make_loaders
from train.integrity import describe_mismatch, tree_signature
from train.resume import RunPlan, plan_run
from train.step import Trainer, make_trainer

__all__ = ["Setup", "prepare", "setup_distributed"]


def setup_distributed(config) -> None:
    """``jax.distributed.initialize()`` when ``config.distributed`` (no-op otherwise).

    On CPU, cross-process collectives go through gloo. Empty/negative fields are left to JAX's
    cluster auto-detection (TPU pods, SLURM, ...).
    """
    if not config.distributed or jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address or None,
        num_processes=config.num_processes or None,
        process_id=config.process_id if config.process_id >= 0 else None,
    )


def _check_vocab(config, model_config, *loaders) -> None:
    """Token ids of file data must fit the model's vocabulary (a gather would clamp them)."""
    vocab = getattr(model_config, "vocab_size", None)
    for loader in loaders:
        tokens = getattr(loader, "tokens_N", None)
        if not vocab or tokens is None or not len(tokens):
            continue
        low, high = int(np.min(tokens)), int(np.max(tokens))
        if low < 0 or high >= vocab:
            raise ConfigError(
                f"data={config.data!r} holds token id {low if low < 0 else high} but "
                f"the model's vocab_size is {vocab} (ids must be in [0, {vocab}))"
            )


def _check_batch(config, mesh) -> None:
    """The global batch (and each micro-batch) must split evenly over the batch axes."""
    axes = logical_to_spec(("batch",), mesh)[0] or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(mesh.shape[a] for a in axes)
    micro = config.batch_size // config.grad_accum
    if micro % ways:
        raise ConfigError(
            f"batch_size={config.batch_size} / grad_accum={config.grad_accum} = {micro} rows "
            f"per micro-batch must be a multiple of the batch-parallel size {ways} "
            f"({' x '.join(f'mesh_{a}={mesh.shape[a]}' for a in axes)})"
        )
    if config.batch_size % jax.process_count():
        raise ConfigError(
            f"batch_size={config.batch_size} must be a multiple of the number of processes "
            f"({jax.process_count()}): each loads its own rows"
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    """The validated pieces of a run."""

    mesh: jax.sharding.Mesh
    trainer: Trainer
    train_data: object
    eval_data: object
    plan: RunPlan


def prepare(config, model_fn, *, model_config=None, init_params=None, train_loss=None) -> Setup:
    """Validate everything a run depends on, creating nothing on disk: the mesh against the
    devices, the batch against the mesh, the model (built and traced on one batch), the
    optimizer's path patterns, the data, ``init_params`` against the model, and the run
    directory (:func:`train.resume.plan_run`). ``train_loss``: see
    :func:`train.step.make_trainer`.

    Raises:
      ConfigError: the first problem found, naming the config field.
    """
    mesh = make_mesh(config.mesh_shape(jax.device_count()))
    _check_batch(config, mesh)
    try:
        trainer = make_trainer(model_fn, config, mesh, train_loss=train_loss)
        abstract_batch = {
            "inputs_BT": jax.ShapeDtypeStruct((config.batch_size, config.seq_len), np.int32),
            "targets_BT": jax.ShapeDtypeStruct((config.batch_size, config.seq_len), np.int32),
            "weights_BT": jax.ShapeDtypeStruct((config.batch_size, config.seq_len), np.float32),
        }
        # traces the forward pass: errors a model raises only when called surface here
        trainer.eval_step.lower(
            trainer.abstract_state["params"], trainer.abstract_rest, abstract_batch
        )
    except (ValueError, NotImplementedError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"model={config.model!r} with model_overrides={','.join(config.model_overrides)} "
            f"cannot run: {type(err).__name__}: {err}"
        ) from None
    train_data, eval_data = make_loaders(config, jax.process_index(), jax.process_count())
    _check_vocab(config, model_config, train_data, eval_data)
    if init_params is not None:
        from jaxattn.layers import AdapterParam

        base = tree_signature(init_params)
        model = tree_signature(trainer.abstract_state["params"])
        # strict on the base: each of its leaves is in the model with its shape and dtype;
        # the model's adapter leaves it lacks keep their fresh initialisation
        adapters = {p for p, i in trainer.param_infos.items() if issubclass(i.kind, AdapterParam)}
        wanted = {k: v for k, v in model.items() if k in base or k not in adapters}
        mismatch = describe_mismatch(base, wanted)
        if mismatch:
            raise ConfigError(
                f"init_from={config.init_from!r} holds other parameters than the model "
                f"(model_overrides={config.model_overrides}): {mismatch}"
            )
    return Setup(mesh, trainer, train_data, eval_data, plan_run(config, model_config))
