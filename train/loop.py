"""The training loop shared by pretraining and finetuning, as importable functions.

``train_loop(config, model_fn)`` builds the mesh and the sharded steps, resumes from the newest
good checkpoint in ``<run_dir>/checkpoints`` (or starts fresh, optionally from given
parameters), trains to ``config.steps`` with periodic evaluation, logging and async
checkpoints, and returns a :class:`RunResult`. Only process 0 writes logs and prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import jax
import numpy as np

from jaxattn.sharding import make_mesh
from train.checkpoints import Checkpointer, config_to_json
from train.config import ConfigError
from train.data import make_loaders
from train.metrics import MetricsWriter, flops_per_token, peak_flops, progress_line
from train.optim import lr_schedule
from train.step import Trainer, make_trainer

__all__ = ["RunResult", "call_length", "evaluate", "host_params", "setup_distributed", "train_loop"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What a run produced: final state and where its outputs are."""

    trainer: Trainer
    state: dict
    rest: dict
    run_dir: str
    start_step: int
    eval_loss: float
    seconds: float


def say(*args) -> None:
    """Print on process 0 only."""
    if jax.process_index() == 0:
        print(*args, flush=True)


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


def evaluate(trainer: Trainer, params, rest, loader, num_batches: int) -> float:
    """Mean held-out NLL (nats/token) over ``num_batches`` batches of ``loader``."""
    nll, weight = 0.0, 0.0
    for i in range(num_batches):
        n, w = trainer.eval_step(params, rest, trainer.put_batch(loader.batch(i)))
        nll, weight = nll + float(n), weight + float(w)
    return nll / max(weight, 1.0)


def host_params(params):
    """numpy copies of (possibly multi-host sharded) params, gathered on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(np.asarray, params)


def _place(tree, shardings):
    """Put host arrays onto the mesh (each process supplies the full value)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        shardings,
    )


def _check_vocab(config, model_config, *loaders) -> None:
    """Token ids of file data must fit the model's vocabulary (a gather would clamp them)."""
    vocab = getattr(model_config, "vocab_size", None)
    for loader in loaders:
        tokens = getattr(loader, "tokens_N", None)
        if vocab and tokens is not None and len(tokens) and int(np.max(tokens)) >= vocab:
            raise ConfigError(
                f"data={config.data!r} holds token id {int(np.max(tokens))} but "
                f"the model's vocab_size is {vocab}"
            )


def call_length(step: int, config) -> int:
    """How many steps the call starting at ``step`` runs: ``config.steps_per_call``, unless
    the next log, eval or checkpoint step (or the end) comes sooner, in which case one.

    Calls run either ``steps_per_call`` steps (``Trainer.train_steps``) or one
    (``Trainer.train_step``), so a run compiles at most two executables, and every boundary
    where the loop must see the state is the end of a call. The split depends only on the
    absolute step and the config: a run resumed from a checkpoint (a boundary) makes the
    same calls, with the same executables, as the uninterrupted run from there on.
    """
    boundary = config.steps
    for every in (config.log_every, config.eval_every, config.ckpt_every):
        boundary = min(boundary, (step // every + 1) * every)
    return config.steps_per_call if boundary - step >= config.steps_per_call else 1


def train_loop(config, model_fn, *, model_config=None, init_params=None) -> RunResult:
    """Train ``model_fn()`` under ``config``; resume if a checkpoint exists.

    Args:
      config: a :class:`train.config.TrainConfig`.
      model_fn: zero-argument model constructor (see :func:`train.step.make_trainer`).
      model_config: the model's config, for the FLOP estimate (optional).
      init_params: host parameters (pure dict) to start from instead of a fresh init, used
        when no checkpoint exists yet (finetuning).

    Returns:
      A :class:`RunResult`.
    """
    t_start = time.time()
    run_dir = config.out_dir
    mesh = make_mesh(config.mesh_shape(jax.device_count()))
    trainer = make_trainer(model_fn, config, mesh)
    train_data, eval_data = make_loaders(config, jax.process_index(), jax.process_count())
    _check_vocab(config, model_config, train_data, eval_data)
    ckpt = Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        every=config.ckpt_every,
        keep=config.keep_checkpoints,
        async_save=config.async_checkpoint,
    )
    state, rest = trainer.init()
    restored = (
        ckpt.restore(trainer.abstract_state, trainer.state_shardings) if config.resume else None
    )
    if restored is not None:
        state, meta = restored
        say(f"resumed at step {meta['step']} from {ckpt.directory}")
    elif init_params is not None:
        state["params"] = _place(init_params, trainer.state_shardings["params"])
    start = int(state["step"])
    writer = MetricsWriter(run_dir, tensorboard=config.tensorboard)
    writer.truncate_after(start)
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=1)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    fpt = flops_per_token(num_params, model_config, config.seq_len)
    peak, peak_label = peak_flops()
    say(
        f"{config.name}: {num_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, "
        f"{config.batch_size}x{config.seq_len} tokens/step, steps {start}->{config.steps}, "
        f"MFU vs {peak_label}"
    )
    schedule = lr_schedule(config)
    meta = {
        "config": dataclasses.asdict(config),
        "model_config": config_to_json(model_config),
    }
    tokens_per_step = config.batch_size * config.seq_len
    pending, timed_tokens, t_last, eval_loss = [], 0, time.time(), math.nan
    compiled = set()
    step = start
    while step < config.steps:
        n = call_length(step, config)
        if n == 1:
            batch = trainer.put_batch(train_data.batch(step))
            state, metrics = trainer.train_step(state, rest, batch)
            metrics = jax.tree.map(lambda x: x[None], metrics)
        else:
            batches = [train_data.batch(s) for s in range(step, step + n)]
            stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
            state, metrics = trainer.train_steps(state, rest, trainer.put_batches(stacked))
        pending.append(metrics)
        step += n
        done = step
        if n not in compiled:  # leave compilation out of the throughput
            compiled.add(n)
            jax.block_until_ready(metrics)
            timed_tokens, t_last = 0, time.time()
        else:
            timed_tokens += n * tokens_per_step
        if done % config.log_every == 0 or done == config.steps:
            got = jax.device_get(pending)
            tok_s = timed_tokens / (time.time() - t_last) if timed_tokens else math.nan
            losses = np.concatenate([m["loss"] for m in got])
            loss, lr = float(np.mean(losses)), float(schedule(done - 1))
            row = {"loss": loss, "grad_norm": got[-1]["grad_norm"][-1], "lr": lr}
            if timed_tokens:
                row |= {"tokens_per_s": tok_s, "mfu": tok_s * fpt / peak}
            writer.write(done, "train", row)
            say(progress_line(done, config.steps, loss, tok_s, tok_s * fpt / peak, lr))
            pending, timed_tokens, t_last = [], 0, time.time()
        if done % config.eval_every == 0 or done == config.steps:
            eval_loss = evaluate(trainer, state["params"], rest, eval_data, config.eval_batches)
            writer.write(done, "eval", {"loss": eval_loss, "perplexity": math.exp(eval_loss)})
            say(f"eval step {done}: loss {eval_loss:.4f}  perplexity {math.exp(eval_loss):.2f}")
            timed_tokens, t_last = 0, time.time()
        if ckpt.save(done, state, {**meta, "data_step": done}, force=done == config.steps):
            timed_tokens, t_last = 0, time.time()  # the save's host copy is not training time
    if start >= config.steps:
        eval_loss = evaluate(trainer, state["params"], rest, eval_data, config.eval_batches)
    ckpt.close()
    writer.close()
    return RunResult(
        trainer=trainer,
        state=state,
        rest=rest,
        run_dir=run_dir,
        start_step=start,
        eval_loss=eval_loss,
        seconds=time.time() - t_start,
    )
