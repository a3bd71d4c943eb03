"""Run directories: what a start finds in ``run_dir`` and whether it may continue there.

:func:`plan_run` decides before anything is created, changed or deleted on disk:

- ``run_dir`` missing or empty: a fresh run.
- ``run_dir`` holds an earlier run (``config.json``, ``metrics.jsonl``, ``checkpoints/``): the
  run continues it. The requested config is compared with the saved one (the train and
  model configs stored in the newest readable checkpoint, else ``config.json``). A field
  that changes what the run computes (model, data, batch, optimizer, seed, dtype, trainable
  set, ...) must be equal, else :class:`train.config.ConfigError` lists every differing field
  and nothing is touched. Harmless fields (:data:`HARMLESS_FIELDS`: steps, intervals,
  mesh, keep-N, outputs, ...) may change; the changes are logged and recorded in the
  metrics. Changing ``steps`` stretches the cosine schedule over the new total.
- ``overwrite=true``: the earlier run's files (:data:`RUN_FILES`) are deleted and the run
  starts over; without it nothing of an earlier run is ever deleted, moved or rewritten
  (``resume=false`` on an earlier run is refused unless ``overwrite=true``).
- anything else (a file, or a non-empty directory holding no run) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import jax

from train.checkpoints import (
    config_from_json,
    config_to_json,
    list_steps,
    read_meta,
    sync_processes,
)
from train.config import ConfigError, TrainConfig

__all__ = ["HARMLESS_FIELDS", "RUN_FILES", "RunPlan", "plan_run", "config_diff", "clear_run"]

log = logging.getLogger(__name__)

# what a run writes in its run_dir
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "tensorboard", "loss.png")

# train-config fields that change no result of a resumed run beyond float rounding
HARMLESS_FIELDS = frozenset(
    {
        "name", "steps", "steps_per_call", "grad_accum", "remat", "nonfinite", "mesh_data",
        "mesh_fsdp", "mesh_tensor", "distributed", "coordinator_address", "num_processes",
        "process_id", "eval_every", "eval_batches", "log_every", "ckpt_every",
        "keep_checkpoints", "async_checkpoint", "run_dir", "resume", "overwrite",
        "tensorboard", "plot", "sample_prompts", "sample_tokens",
    }
)  # fmt: skip
# model-config fields that choose how, not what, the model computes
HARMLESS_MODEL_FIELDS = frozenset({"attention_impl", "implementation"})
# compared through the resolved model config whenever the saved run stored one
_MODEL_SELECTORS = ("model", "model_overrides")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What :func:`plan_run` found: ``kind`` is "fresh", "continue" (an earlier run, resumed
    from its newest good checkpoint or, when it has none, retrained from step 0 with its
    metrics kept) or "overwrite"; ``saved_step`` the newest checkpoint step (None: none);
    ``changes`` the harmless fields that differ from the saved run ("key: old -> new")."""

    kind: str
    run_dir: str
    saved_step: int | None = None
    changes: tuple[str, ...] = ()


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _flatten(tree, prefix: str = "") -> dict:
    """Nested config JSON as ``{"rope.theta": 10000.0, ...}``."""
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def _normalised_model(saved_json):
    """A stored model config as the current code reads it (fields added since then take
    their defaults, removed ones drop out); the raw JSON when it no longer loads."""
    try:
        return config_to_json(config_from_json(saved_json))
    except Exception:  # noqa: BLE001 - compare the raw fields instead
        return saved_json


def config_diff(saved: dict, requested: dict, harmless=frozenset()) -> tuple[list, list]:
    """Fields of two flat config dicts that differ, split into ``(changing, harmless)``.

    Each entry reads ``"key: saved -> requested"``; a key missing on one side shows as
    ``<absent>``.
    """
    changing, benign = [], []
    for key in sorted(set(saved) | set(requested)):
        old, new = saved.get(key, "<absent>"), requested.get(key, "<absent>")
        if old != new:
            entry = f"{key}: {old!r} -> {new!r}"
            (benign if key.split(".")[-1] in harmless else changing).append(entry)
    return changing, benign


def _saved_configs(run_dir: str) -> tuple[dict | None, object, int | None]:
    """``(train config dict, model config JSON or None, newest step)`` of an earlier run."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = list_steps(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    for step in reversed(steps):
        try:
            meta = read_meta(ckpt_dir, step)
        except Exception as err:  # noqa: BLE001 - a bad step; restore will say so
            log.debug("step %d metadata unreadable: %s", step, err)
            continue
        return meta.get("config"), meta.get("model_config"), steps[-1]
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f), None, steps[-1] if steps else None
    return None, None, steps[-1] if steps else None


def _compare(config: TrainConfig, model_json, saved: dict | None, saved_model, where: str):
    defaults = _jsonable(dataclasses.asdict(TrainConfig()))
    requested = _jsonable(dataclasses.asdict(config))
    saved = {k: saved.get(k, defaults[k]) for k in requested} if saved is not None else {}
    if saved_model is not None and model_json is not None:
        for key in _MODEL_SELECTORS:  # the resolved model configs decide
            saved.pop(key, None)
            requested.pop(key, None)
    changing, benign = config_diff(saved, requested, HARMLESS_FIELDS) if saved else ([], [])
    if saved_model is not None and model_json is not None:
        model_changing, model_benign = config_diff(
            _flatten(_normalised_model(saved_model)), _flatten(model_json), HARMLESS_MODEL_FIELDS
        )
        changing += [f"model_config.{e}" for e in model_changing]
        benign += [f"model_config.{e}" for e in model_benign]
    if changing:
        raise ConfigError(
            f"run_dir={config.out_dir!r} holds a run ({where}) whose config differs in "
            f"fields that change what it computes: {'; '.join(changing)}. Resume with the "
            "saved values, choose another run_dir, or pass --set overwrite=true to delete "
            "the earlier run and start over"
        )
    return tuple(benign)


def plan_run(config: TrainConfig, model_config=None) -> RunPlan:
    """Decide how a run starts in ``config.out_dir`` (reads only; see the module docstring).

    Args:
      config: the requested training config.
      model_config: the requested model config (compared with the saved one when both are
        known; the parameter tree is checked at restore in any case).

    Raises:
      ConfigError: the directory holds something else, or an earlier run whose config
        differs in fields that change the run, or ``resume=false`` without ``overwrite``.
    """
    run_dir = config.out_dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir={run_dir!r} is a file, not a directory")
    entries = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    if not entries:
        return RunPlan("fresh", run_dir)
    if not any(name in entries for name in RUN_FILES):
        raise ConfigError(
            f"run_dir={run_dir!r} is not empty and holds no run ({', '.join(RUN_FILES[:3])}); "
            "choose a new or empty directory"
        )
    saved, saved_model, step = _saved_configs(run_dir)
    if config.overwrite:
        return RunPlan("overwrite", run_dir, step)
    if not config.resume:
        raise ConfigError(
            f"resume=false but run_dir={run_dir!r} holds an earlier run"
            f"{f' (checkpoint step {step})' if step is not None else ''}; pass "
            "--set overwrite=true to delete it and start over, or choose another run_dir"
        )
    model_json = config_to_json(model_config) if model_config is not None else None
    where = f"checkpoint step {step}" if step is not None else "config.json"
    changes = _compare(config, model_json, saved, saved_model, where)
    return RunPlan("continue", run_dir, step, changes)


def clear_run(run_dir: str) -> list[str]:
    """Delete the files of an earlier run (:data:`RUN_FILES`) in ``run_dir`` on process 0;
    other files stay. Returns the names deleted."""
    deleted = []
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            deleted.append(name)
            if jax.process_index() == 0:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    sync_processes("clear_run")
    return deleted
