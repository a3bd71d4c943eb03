"""The training loop shared by pretraining and finetuning, as importable functions.

``train_loop(config, model_fn)`` validates the config against the devices, model and data
(:func:`prepare`, which creates nothing on disk), resumes from the newest good checkpoint in
``<run_dir>/checkpoints`` (or starts fresh, optionally from given parameters), trains to
``config.steps`` with periodic evaluation, logging and async checkpoints, and returns a
:class:`RunResult`. Only process 0 writes logs and prints.

Non-finite steps: at every log, eval and checkpoint boundary the loop reads the per-step
``finite`` flags of the steps since the previous boundary (each step of a multi-step call has
its own). Under ``nonfinite="stop"`` the first non-finite step stops the run with
:class:`NonFiniteError` naming that exact step; its state is never logged as a loss,
evaluated or saved, earlier checkpoints and metrics are kept. Under ``"skip"`` the compiled
step has already left the state unchanged; the log row counts the skipped steps
(``skipped``) and averages the loss over the others.

A run already at ``config.steps`` trains nothing and says so (pass a larger ``steps`` to
continue it).
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

from train.checkpoints import Checkpointer, config_to_json, sync_processes
from train.config import ConfigError
from train.integrity import tree_digest
from train.metrics import MetricsWriter, flops_per_token, peak_flops, progress_line
from train.optim import lr_schedule, merge_params, path_string, split_params
from train.resume import clear_run
from train.setup import Setup, prepare, setup_distributed
from train.step import Trainer

__all__ = [
    "NonFiniteError",
    "RunResult",
    "call_length",
    "evaluate",
    "host_params",
    "prepare",
    "setup_distributed",  # re-exported from train.setup
    "train_loop",
]

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

    def __repr__(self) -> str:  # the state alone would print every parameter
        steps = int(jax.device_get(self.state["step"]))
        num_params = sum(x.size for x in jax.tree.leaves(self.state["params"]))
        return (
            f"RunResult(run_dir={self.run_dir!r}, steps {self.start_step}->{steps}, "
            f"{num_params / 1e6:.2f}M params, eval_loss={self.eval_loss:.4f}, "
            f"seconds={self.seconds:.1f})"
        )


def say(*args) -> None:
    """Print on process 0 only."""
    if jax.process_index() == 0:
        print(*args, flush=True)


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


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss, gradient norm or update (``nonfinite="stop"``)."""


def _first_nonfinite(host_metrics) -> tuple[int, dict] | None:
    """``(step, values)`` of the first non-finite step in ``[(first_step, metrics), ...]``."""
    for first, m in host_metrics:
        bad = np.flatnonzero(~np.asarray(m["finite"], bool))
        if bad.size:
            i = int(bad[0])
            return first + i + 1, {k: float(m[k][i]) for k in ("loss", "grad_norm")}
    return None


def _nonfinite_message(step: int, values: dict, ckpt: Checkpointer) -> str:
    what = (
        "loss" if not math.isfinite(values["loss"])
        else "gradient norm" if not math.isfinite(values["grad_norm"])
        else "parameter update"
    )  # fmt: skip
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"the last checkpoint (step {last}) is untouched" if last else "no checkpoint was saved"
    return (
        f"non-finite {what} at step {step} (loss {values['loss']}, grad norm "
        f"{values['grad_norm']}); training stopped: nothing of that state was saved, {kept} "
        "and the metrics so far are kept. Resume with --set nonfinite=skip to skip such steps, "
        "or lower lr"
    )


@dataclasses.dataclass(frozen=True)
class _Base:
    """A fine-tuning run's base: its frozen leaves (``params``, host) are not saved again;
    checkpoints hold the other leaves and ``reference`` (where the base came from and a
    digest of every base leaf's checksum), verified against the base loaded at resume."""

    params: dict
    reference: dict
    paths: frozenset  # of ``params``

    @classmethod
    def of(cls, config, init_params, trainer) -> _Base:
        paths = set(_flat_keys(init_params))
        reference = {"init_from": os.path.abspath(config.init_from or "."),
                     "digest": tree_digest(init_params), "leaves": len(paths)}  # fmt: skip
        frozen_base = paths - trainer.trainable
        return cls(split_params(init_params, frozen_base)[0], reference, frozenset(frozen_base))

    def saved(self, state: dict) -> dict:
        """``state`` with the frozen base leaves left out (what a checkpoint holds)."""
        return {**state, "params": split_params(state["params"], self.paths)[1]}


def _flat_keys(tree) -> list[str]:
    return [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _start(config, setup: Setup, ckpt: Checkpointer, init_params, base: _Base | None):
    """The state to start from (restored, given, or fresh) and the step it is at."""
    trainer, plan = setup.trainer, setup.plan
    state, rest = trainer.init()
    restored = None
    abstract, shardings = trainer.abstract_state, trainer.state_shardings
    if base is not None:
        abstract, shardings = base.saved(abstract), base.saved(shardings)
    if plan.kind == "continue":
        restored = ckpt.restore(abstract, shardings)
        if restored is None and plan.saved_step is not None:
            say(f"no usable checkpoint in {ckpt.directory}; training again from step 0")
    if restored is not None:
        state, meta = restored
        if base is not None:
            saved_ref = meta.get("base", {})
            if saved_ref.get("digest") != base.reference["digest"]:
                raise ConfigError(
                    f"init_from={config.init_from!r} is not the base this fine-tuning run "
                    f"started from (checkpoint step {meta['step']} references "
                    f"{saved_ref.get('init_from')!r} with digest {saved_ref.get('digest')}, "
                    f"init_from now has digest {base.reference['digest']}); restore that base "
                    "or start a new run_dir"
                )
            frozen_sh = split_params(trainer.state_shardings["params"], base.paths)[0]
            state["params"] = merge_params(state["params"], _place(base.params, frozen_sh))
        say(f"resumed at step {meta['step']} from {ckpt.directory}")
    elif init_params is not None:
        paths = set(_flat_keys(init_params))
        fresh, _ = split_params(state["params"], set(_flat_keys(state["params"])) - paths)
        if fresh:
            say(f"parameters not in init_from start fresh: {', '.join(_flat_keys(fresh))}")
        given_sh = split_params(trainer.state_shardings["params"], paths)[0]
        state["params"] = merge_params(fresh, _place(init_params, given_sh))
    return state, rest, int(state["step"])


def train_loop(
    config, model_fn, *, model_config=None, init_params=None, train_loss=None
) -> RunResult:
    """Train ``model_fn()`` under ``config``; resume if the run directory holds a run.

    Everything that depends on the input is validated first (:func:`prepare`); only then is
    anything created on disk. An earlier run in the run directory is resumed from its newest
    good checkpoint (``train.resume`` says when that is refused, ``train.checkpoints`` what
    happens to bad steps); its metrics are appended to, never rewritten.

    Args:
      config: a :class:`train.config.TrainConfig`.
      model_fn: zero-argument model constructor (see :func:`train.step.make_trainer`).
      model_config: the model's config, for the FLOP estimate and the resume check (optional).
      init_params: host parameters (pure dict) to start from instead of a fresh init, used
        when no checkpoint exists yet (finetuning).
      train_loss: the loss the train step minimises instead of the next-token NLL
        (:func:`train.step.make_trainer`); evaluation still reports the NLL.

    Returns:
      A :class:`RunResult`.

    Raises:
      ConfigError: bad input (before anything is created).
      NonFiniteError: a non-finite step under ``nonfinite="stop"``.
    """
    t_start = time.time()
    setup = prepare(
        config, model_fn, model_config=model_config, init_params=init_params, train_loss=train_loss
    )
    # every process has read the run directory before any of them writes to it
    sync_processes("train_loop_planned")
    trainer, run_dir, plan = setup.trainer, setup.plan.run_dir, setup.plan
    if plan.kind == "overwrite":
        deleted = clear_run(run_dir)
        say(f"overwrite=true: deleted {', '.join(deleted)} of the earlier run in {run_dir}")
    ckpt = Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        every=config.ckpt_every,
        keep=config.keep_checkpoints,
        async_save=config.async_checkpoint,
    )
    writer = None
    try:
        base = None if init_params is None else _Base.of(config, init_params, trainer)
        state, rest, start = _start(config, setup, ckpt, init_params, base)
        resumed = plan.kind == "continue"
        writer = MetricsWriter(
            run_dir, tensorboard=config.tensorboard, purge_step=start if resumed else None
        )
        if plan.changes:
            say(f"resuming with changed settings: {'; '.join(plan.changes)}")
        writer.event(start, "resume" if resumed else "start", changes=list(plan.changes))
        config_path = os.path.join(run_dir, "config.json")
        if jax.process_index() == 0 and not os.path.exists(config_path):
            with open(config_path, "w") as f:  # the run's first config; never rewritten
                json.dump(dataclasses.asdict(config), f, indent=1)
        state, eval_loss = _train(
            config, setup, ckpt, writer, state, rest, start, model_config, base
        )
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()
    return RunResult(
        trainer=trainer,
        state=state,
        rest=trainer.with_stats(rest, state),  # the trained statistics (DGQA's EMA) in place
        run_dir=run_dir,
        start_step=start,
        eval_loss=eval_loss,
        seconds=time.time() - t_start,
    )


def _train(config, setup, ckpt, writer, state, rest, start, model_config, base):
    """The loop proper: steps, checks, logs, evals, saves. Returns the final state and loss."""
    trainer, eval_data, train_data = setup.trainer, setup.eval_data, setup.train_data
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    fpt = flops_per_token(num_params, model_config, config.seq_len)
    peak, peak_label = peak_flops()
    say(
        f"{config.name}: {num_params / 1e6:.2f}M params, mesh {dict(setup.mesh.shape)}, "
        f"{config.batch_size}x{config.seq_len} tokens/step, steps {start}->{config.steps}, "
        f"MFU vs {peak_label}"
    )
    if start >= config.steps:
        say(
            f"{setup.plan.run_dir} is already at step {start} (steps={config.steps}): nothing "
            f"to train; pass --set steps=N with N > {start} to continue, or --set "
            "overwrite=true to start over"
        )
    schedule = lr_schedule(config)
    meta = {
        "config": dataclasses.asdict(config),
        "model_config": config_to_json(model_config),
    }
    if base is not None:
        meta["base"] = base.reference
    tokens_per_step = config.batch_size * config.seq_len
    unchecked, interval, skipped = [], [], 0
    timed_tokens, t_last, eval_loss = 0, time.time(), math.nan
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
        unchecked.append((step, metrics))
        step += n
        done = step
        if n not in compiled:  # leave compilation out of the throughput
            compiled.add(n)
            jax.block_until_ready(metrics)
            timed_tokens, t_last = 0, time.time()
        else:
            timed_tokens += n * tokens_per_step
        log_now = done % config.log_every == 0 or done == config.steps
        eval_now = done % config.eval_every == 0 or done == config.steps
        save_now = done % config.ckpt_every == 0 or done == config.steps
        if not (log_now or eval_now or save_now):
            continue
        # every boundary checks the steps since the last one: nothing non-finite is logged
        # as a loss, evaluated or saved
        host = jax.device_get(unchecked)
        unchecked = []
        bad = _first_nonfinite(host)
        if bad is not None and config.nonfinite == "stop":
            writer.event(bad[0], "nonfinite", **{k: str(v) for k, v in bad[1].items()})
            raise NonFiniteError(_nonfinite_message(bad[0], bad[1], ckpt))
        interval += [m for _, m in host]
        if log_now:
            tok_s = timed_tokens / (time.time() - t_last) if timed_tokens else math.nan
            finite = np.concatenate([m["finite"] for m in interval]).astype(bool)
            losses = np.concatenate([m["loss"] for m in interval])[finite]
            loss, lr = (
                float(np.mean(losses)) if losses.size else math.nan,
                float(schedule(done - 1)),
            )
            row = {"loss": loss, "grad_norm": interval[-1]["grad_norm"][-1], "lr": lr}
            aux = np.concatenate([m["aux_loss"] for m in interval])[finite]
            if aux.size and aux.any():  # only models whose layers sow auxiliary losses
                row["aux_loss"] = float(np.mean(aux))
            if timed_tokens:
                row |= {"tokens_per_s": tok_s, "mfu": tok_s * fpt / peak}
            if not finite.all():
                row["skipped"] = int((~finite).sum())
                skipped += row["skipped"]
                say(f"step {done}: skipped {row['skipped']} non-finite steps ({skipped} so far)")
            writer.write(done, "train", row)
            say(progress_line(done, config.steps, loss, tok_s, tok_s * fpt / peak, lr))
            interval, timed_tokens, t_last = [], 0, time.time()
        if eval_now:
            current = trainer.with_stats(rest, state)  # the tracked statistics of this step
            eval_loss = evaluate(trainer, state["params"], current, eval_data, config.eval_batches)
            writer.write(done, "eval", {"loss": eval_loss, "perplexity": math.exp(eval_loss)})
            say(f"eval step {done}: loss {eval_loss:.4f}  perplexity {math.exp(eval_loss):.2f}")
            timed_tokens, t_last = 0, time.time()
        saved = state if base is None else base.saved(state)
        if ckpt.save(done, saved, {**meta, "data_step": done}, force=done == config.steps):
            timed_tokens, t_last = 0, time.time()  # the save's host copy is not training time
    if start >= config.steps:
        current = trainer.with_stats(rest, state)
        eval_loss = evaluate(trainer, state["params"], current, eval_data, config.eval_batches)
    return state, eval_loss
