"""Checkpoints: Orbax ``CheckpointManager`` with async saves, keep-N, and verified restores.

A step directory holds three items: ``params`` (the fp32 master weights, restorable alone for
sampling and finetuning), ``train`` (optimizer state, step counter, RNG key) and ``meta`` (JSON:
data position, config, and a checksum of params and train state). Orbax writes each step into
a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous step as the latest one. A finished step whose files were later truncated or corrupted
fails to restore or fails its checksum; :meth:`Checkpointer.restore` then moves it aside and
falls back to the newest good step. Restoring onto another mesh reshards (the target's
shardings decide the layout).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "Checkpointer",
    "state_checksum",
    "read_meta",
    "restore_params",
    "config_to_json",
    "config_from_json",
]

# dataclasses a checkpoint's JSON may name (nothing else is imported from metadata)
_TRUSTED_MODULES = ("models.", "jaxattn.", "train.")

log = logging.getLogger(__name__)


@jax.jit
def _checksum(tree) -> jax.Array:
    """uint32 fingerprint of every bit of every leaf (position-weighted, wrapping sums)."""
    total = jnp.zeros((), jnp.uint32)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        leaf = jnp.asarray(leaf).reshape(-1)
        if leaf.dtype.itemsize == 4:
            bits = jax.lax.bitcast_convert_type(leaf, jnp.uint32)
        elif leaf.dtype.itemsize == 2:
            bits = jax.lax.bitcast_convert_type(leaf, jnp.uint16).astype(jnp.uint32)
        else:
            bits = leaf.astype(jnp.uint32)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
        total = total + jnp.sum(bits * weights, dtype=jnp.uint32) * jnp.uint32(2 * i + 1)
    return total


def state_checksum(tree) -> int:
    """Checksum (Python int) of a pytree of arrays; equal trees give equal checksums."""
    return int(jax.device_get(_checksum(tree)))


def _target(abstract, shardings):
    """ShapeDtypeStructs carrying the shardings to restore onto."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


class Checkpointer:
    """Saves and restores ``(params, train, meta)`` under ``directory``.

    Args:
      directory: checkpoint root (one sub-directory per step).
      every: save every this many steps (others are skipped unless forced).
      keep: how many recent steps to keep.
      async_save: write in a background thread (call :meth:`wait` before reading them).
    """

    def __init__(self, directory: str, *, every: int = 100, keep: int = 3, async_save: bool = True):
        self.directory, self.every = os.path.abspath(directory), every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "train", "meta")
        )

    def save(self, step: int, state: dict, meta: dict, *, force: bool = False) -> bool:
        """Save a train state (``{"params", "opt_state", "step", "rng"}``) if due at ``step``.

        Returns:
          Whether a save was started.
        """
        if not (force or step % self.every == 0):  # orbax's own policy also saves step 1
            return False
        train = {k: v for k, v in state.items() if k != "params"}
        meta = {**meta, "step": int(step), "checksum": state_checksum((state["params"], train))}
        return self.manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, abstract_state: dict, shardings: dict):
        """Newest good checkpoint, placed with ``shardings``; bad steps are moved aside.

        Args:
          abstract_state: the state's structure (arrays or ShapeDtypeStructs).
          shardings: a matching tree of shardings (the mesh may differ from the saving run's).

        Returns:
          ``(state, meta)``, or None when there is no good checkpoint.
        """
        params_t = _target(abstract_state["params"], shardings["params"])
        train_t = _target(
            {k: v for k, v in abstract_state.items() if k != "params"},
            {k: v for k, v in shardings.items() if k != "params"},
        )
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(params_t),
                        train=ocp.args.StandardRestore(train_t),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                ok = state_checksum((got["params"], got["train"])) == got["meta"]["checksum"]
                reason = "checksum mismatch"
            except Exception as err:  # noqa: BLE001 - any failure to read means a bad step
                ok, reason = False, f"{type(err).__name__}: {str(err)[:200]}"
            if ok:
                return {"params": got["params"], **got["train"]}, got["meta"]
            log.warning(
                "checkpoint step %d in %s is unreadable (%s); using an older step",
                step,
                self.directory,
                reason,
            )
            self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        """Move a bad step out of the manager's directory (kept for inspection)."""
        if jax.process_index() == 0:
            bad = os.path.join(os.path.dirname(self.directory), "corrupted_checkpoints")
            os.makedirs(bad, exist_ok=True)
            dest = os.path.join(bad, f"{step}-{len(os.listdir(bad))}")
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self.manager.reload()

    def latest_step(self) -> int | None:
        """The newest saved step (not verified)."""
        return self.manager.latest_step()

    def wait(self) -> None:
        """Block until async saves have finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.close()


def _reader(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        item_names=("params", "meta"),
        options=ocp.CheckpointManagerOptions(read_only=True),
    )


def read_meta(directory: str, step: int | None = None) -> dict:
    """The JSON metadata (config, model config, step, data position) of a checkpoint step.

    Raises:
      FileNotFoundError: no checkpoint under ``directory``.
    """
    manager = _reader(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint steps under {directory!r}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    return meta


def restore_params(directory: str, abstract_params, shardings=None, step: int | None = None):
    """Restore only the parameters (and meta) of a checkpoint, e.g. for sampling or finetuning.

    Args:
      directory: a checkpoint root written by :class:`Checkpointer`.
      abstract_params: the params' structure; ``shardings`` (a matching tree) places them,
        default on the first device.
      step: a step to read, default the newest.

    Returns:
      ``(params, meta)``.

    Raises:
      FileNotFoundError: no checkpoint under ``directory``.
    """
    manager = _reader(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint steps under {directory!r}")
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_params)
    got = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_target(abstract_params, shardings)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    manager.close()
    return got["params"], got["meta"]


def config_to_json(obj):
    """JSON-able form of a (nested) config dataclass; dtypes become ``{"__dtype__": name}``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        kind = f"{type(obj).__module__}:{type(obj).__qualname__}"
        fields = {f.name: config_to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"__dataclass__": kind, **fields}
    if isinstance(obj, (list, tuple)):
        return [config_to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): config_to_json(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    try:
        return {"__dtype__": jnp.dtype(obj).name}
    except TypeError:
        raise TypeError(f"cannot store {obj!r} ({type(obj).__name__}) in checkpoint JSON") from None


def config_from_json(data):
    """Inverse of :func:`config_to_json` (lists become tuples; only trusted modules load).

    Raises:
      ValueError: a dataclass from a module outside models/jaxattn/train.
    """
    if isinstance(data, list):
        return tuple(config_from_json(x) for x in data)
    if not isinstance(data, dict):
        return data
    if "__dtype__" in data:
        return jnp.dtype(data["__dtype__"])
    if "__dataclass__" not in data:
        return {k: config_from_json(v) for k, v in data.items()}
    module, qualname = data["__dataclass__"].split(":")
    if not module.startswith(_TRUSTED_MODULES):
        raise ValueError(f"checkpoint names an untrusted config class {data['__dataclass__']!r}")
    cls = getattr(importlib.import_module(module), qualname)
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: config_from_json(v) for k, v in data.items() if k in init})


def to_numpy(tree):
    """Host copies of a pytree of (fully addressable) arrays, for comparisons and export."""
    return jax.tree.map(np.asarray, tree)
