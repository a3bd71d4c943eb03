"""Checkpoints: Orbax ``CheckpointManager`` with async saves, keep-N, and verified restores.

A step directory holds three items: ``params`` (the fp32 master weights, restorable alone for
sampling and finetuning), ``train`` (optimizer state, step counter, RNG key) and ``meta`` (JSON:
data position, train and model config, and a checksum of every leaf; see
``train.integrity``). Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous step as the latest one (the temporary
directory is removed when the next run opens the checkpoints).

What happens to a bad step. A finished step that later fails to read or fails its integrity
check is skipped *in place*: :meth:`Checkpointer.restore` logs one line naming the step and
why, and falls back to the newest good step; nothing is deleted or moved. A step whose
stored parameter tree does not match the model being restored (another model config) is
not corrupt: restoring stops with a :class:`train.config.ConfigError` naming the differing
parameters, and the step is left alone. Keep-N counts only steps not known to be bad, and
never deletes a known-bad one, so newer corrupt steps cannot push the last good checkpoint
out. When training reaches a known-bad step again and saves there, the bad directory is
renamed to ``<step>.corrupt-<k>`` beside the others (orbax ignores that name; it stays for
inspection) and the new checkpoint takes the step's name.

Every reader verifies what it loads: :meth:`Checkpointer.restore` (resume) and
:func:`restore_params` (sampling, finetuning) raise or skip on a checksum mismatch, naming
the step directory and the parameter paths. Restoring onto another mesh reshards (the
target's shardings decide the layout).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import orbax.checkpoint as ocp

from train.config import ConfigError, config_from_json, config_to_json  # re-exported
from train.integrity import (
    ALGORITHM,
    CheckpointError,
    describe_mismatch,
    leaf_checksums,
    one_line,
    tree_signature,
    verify,
)

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "list_steps",
    "sync_processes",
    "read_meta",
    "restore_params",
    "restore_stats",
    "config_to_json",  # (defined in train.config)
    "config_from_json",
]


log = logging.getLogger(__name__)


def _handlers() -> dict:
    # naming every item's handler lets orbax read metadata without "could not be restored"
    # warnings for the items a reader does not ask for
    return {
        "params": ocp.StandardCheckpointHandler(),
        "train": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _target(abstract, shardings):
    """ShapeDtypeStructs carrying the shardings to restore onto."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def _split_train(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "params"}


@dataclasses.dataclass
class _KeepGood:
    """Orbax preservation policy: the ``n`` newest steps not in ``bad``, and every bad one."""

    n: int
    bad: set

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        good = sorted(c.step for c in checkpoints if c.step not in self.bad)
        keep = set(good[-self.n :])
        return [c.step in self.bad or c.step in keep for c in checkpoints]


def sync_processes(name: str) -> None:
    """Barrier across the processes of a multi-host run (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _saved_signature(manager, step: int, items) -> dict:
    """``{item: tree_signature}`` of a step's stored trees (raises if unreadable)."""
    metadata = manager.item_metadata(step)
    out = {}
    for item in items:
        tree = metadata[item]
        if tree is None:
            raise CheckpointError(f"item {item!r} has no metadata")
        out[item] = tree_signature(getattr(tree, "tree", tree))
    return out


def _check_structure(saved: dict, wanted: dict, where: str) -> None:
    for item in wanted:
        mismatch = describe_mismatch(saved[item], wanted[item])
        if mismatch:
            raise ConfigError(
                f"checkpoint {where} does not match the model being restored (it is not "
                f"corrupt and is left untouched): {item} {mismatch}"
            )


class Checkpointer:
    """Saves and restores ``(params, train, meta)`` under ``directory``.

    Args:
      directory: checkpoint root (one sub-directory per step).
      every: save every this many steps (others are skipped unless forced).
      keep: how many recent good steps to keep (known-bad steps are kept besides).
      async_save: write in a background thread (call :meth:`wait` before reading them).
    """

    def __init__(self, directory: str, *, every: int = 100, keep: int = 3, async_save: bool = True):
        self.directory, self.every = os.path.abspath(directory), every
        self.bad: set[int] = set()  # steps that failed to restore; never read again
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            preservation_policy=_KeepGood(keep, self.bad),
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handlers()
        )

    def save(self, step: int, state: dict, meta: dict, *, force: bool = False) -> bool:
        """Save a train state (``{"params", "opt_state", "step", "rng"}``) if due at ``step``.

        Raises:
          CheckpointError: the state holds non-finite values (never saved).

        Returns:
          Whether a save was started.
        """
        if not (force or step % self.every == 0):  # orbax's own policy also saves step 1
            return False
        train = _split_train(state)
        sums, finite = {}, {}
        for item, tree in (("params", state["params"]), ("train", train)):
            sums[item], item_finite = leaf_checksums(tree)
            finite |= {f"{item}/{k}": ok for k, ok in item_finite.items()}
        bad_leaves = [k for k, ok in finite.items() if not ok]
        if bad_leaves:
            raise CheckpointError(f"refusing to save step {step}: non-finite {bad_leaves[:4]}")
        if step in self.bad:
            self._set_aside(step)
        meta = {**meta, "step": int(step), "leaf_checksums": {"algorithm": ALGORITHM, **sums}}
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
        """Newest good checkpoint, verified and placed with ``shardings``.

        Steps that cannot be read or fail their integrity check are skipped with a warning
        (left in place, remembered in :attr:`bad`).

        Args:
          abstract_state: the state's structure (arrays or ShapeDtypeStructs).
          shardings: a matching tree of shardings (the mesh may differ from the saving run's).

        Returns:
          ``(state, meta)``, or None when there is no good checkpoint.

        Raises:
          ConfigError: a step's parameter or optimizer tree differs from ``abstract_state``
            (another model or optimizer; nothing is skipped or changed).
        """
        targets = {
            "params": _target(abstract_state["params"], shardings["params"]),
            "train": _target(_split_train(abstract_state), _split_train(shardings)),
        }
        wanted = {k: tree_signature(v) for k, v in targets.items()}
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            if step in self.bad:
                continue
            where = os.path.join(self.directory, str(step))
            try:
                saved = _saved_signature(self.manager, step, targets)
            except Exception as err:  # noqa: BLE001 - unreadable metadata: a bad step
                reason = one_line(err)
            else:
                _check_structure(saved, wanted, where)
                try:
                    got = self.manager.restore(
                        step,
                        args=ocp.args.Composite(
                            params=ocp.args.StandardRestore(targets["params"]),
                            train=ocp.args.StandardRestore(targets["train"]),
                            meta=ocp.args.JsonRestore(),
                        ),
                    )
                    verify({"params": got["params"], "train": got["train"]}, got["meta"], where)
                    return {"params": got["params"], **got["train"]}, got["meta"]
                except CheckpointError as err:
                    reason = str(err).removeprefix(f"{where}: ")
                except Exception as err:  # noqa: BLE001 - any failure to read means a bad step
                    reason = one_line(err)
            log.warning(
                "checkpoint step %d in %s is unusable (%s); skipping it (left in place) and "
                "trying an older step",
                step,
                self.directory,
                reason,
            )
            self.bad.add(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Rename a known-bad step to ``<step>.corrupt-<k>`` so a new save can take its name."""
        self.manager.wait_until_finished()
        src = os.path.join(self.directory, str(step))
        k = 0
        while os.path.exists(f"{src}.corrupt-{k}"):
            k += 1
        if jax.process_index() == 0 and os.path.isdir(src):
            os.rename(src, f"{src}.corrupt-{k}")
            log.warning(
                "saving step %d again; its earlier checkpoint, which failed its integrity "
                "check, is kept as %s",
                step,
                f"{src}.corrupt-{k}",
            )
        sync_processes(f"set_aside_{step}")
        self.bad.discard(step)
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
    """A manager that only reads (no ``read_only`` option: orbax warns on every use of it)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(create=False),
    )


def list_steps(directory: str) -> list[int]:
    """The finished steps under a checkpoint root (not verified), oldest first."""
    manager = _reader(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _pick_step(manager, directory: str, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps under {directory!r}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} under {directory!r}; steps: {steps}")
    return step


def read_meta(directory: str, step: int | None = None) -> dict:
    """The JSON metadata (config, model config, step, data position) of a checkpoint step.

    Raises:
      FileNotFoundError: no checkpoint (or no such step) under ``directory``.
      CheckpointError: the step's metadata cannot be read.
    """
    manager = _reader(directory)
    try:
        step = _pick_step(manager, directory, step)
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            return manager.restore(step, args=args)["meta"]
        except Exception as err:  # noqa: BLE001 - report which step and why, in one line
            where = os.path.join(os.path.abspath(directory), str(step))
            raise CheckpointError(f"{where}: unreadable metadata ({one_line(err)})") from None
    finally:
        manager.close()


def _int_keys(tree):
    """Stored metadata names list/dict-of-layer keys as strings; the pure dicts of NNX use
    ints, whose order (1, 2, 10) differs from the strings' ("1", "10", "2")."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}  # fmt: skip
    if isinstance(tree, (list, tuple)):
        return type(tree)(_int_keys(v) for v in tree)
    return tree


def restore_params(directory: str, abstract_params, shardings=None, step: int | None = None):
    """Restore only the parameters (and meta) of a checkpoint, verified, e.g. for sampling
    or finetuning.

    Args:
      directory: a checkpoint root written by :class:`Checkpointer`.
      abstract_params: the params' structure; ``shardings`` (a matching tree) places them,
        default on the first device.
      step: a step to read, default the newest.

    Returns:
      ``(params, meta)``.

    Raises:
      FileNotFoundError: no checkpoint (or no such step) under ``directory``.
      ValueError: the stored parameter tree differs from ``abstract_params`` (names the
        parameters).
      CheckpointError: the step cannot be read or fails its integrity check (names the step
        directory and the parameters).
    """
    manager = _reader(directory)
    try:
        step = _pick_step(manager, directory, step)
        where = os.path.join(os.path.abspath(directory), str(step))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if shardings is None:
            shardings = jax.tree.map(lambda _: device, abstract_params)
        targets = {"params": _target(abstract_params, shardings)}
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
            legacy = "leaf_checksums" not in meta
            metadata = manager.item_metadata(step)
            saved = tree_signature(getattr(metadata["params"], "tree", metadata["params"]))
        except Exception as err:  # noqa: BLE001 - report which step and why, in one line
            raise CheckpointError(f"{where}: unreadable ({one_line(err)})") from None
        mismatch = describe_mismatch(saved, tree_signature(targets["params"]))
        if mismatch:
            raise ValueError(f"checkpoint {where} does not match the model: params {mismatch}")
        if legacy:  # the whole-tree checksum also covers the train state
            train = _int_keys(getattr(metadata["train"], "tree", metadata["train"]))
            targets["train"] = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), train
            )
        args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
        try:
            got = manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:  # noqa: BLE001 - report which step and why, in one line
            raise CheckpointError(f"{where}: unreadable ({one_line(err)})") from None
        verify({k: got[k] for k in targets}, meta, where)
        return got["params"], meta
    finally:
        manager.close()


def restore_stats(directory: str, step: int) -> dict | None:
    """The tracked statistics (``state["stats"]``: ``nnx.BatchStat`` values such as DGQA's
    key-norm EMA) of a checkpoint step, verified, on the first device; None when the step
    holds none. Reads the whole train item (the statistics are a part of it).

    Raises:
      CheckpointError: the step cannot be read or fails its integrity check.
    """
    manager = _reader(directory)
    try:
        where = os.path.join(os.path.abspath(directory), str(step))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
            train = manager.item_metadata(step)["train"]
            train = _int_keys(getattr(train, "tree", train))
        except Exception as err:  # noqa: BLE001 - report which step and why, in one line
            raise CheckpointError(f"{where}: unreadable ({one_line(err)})") from None
        if "stats" not in train:
            return None
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), train
        )
        try:
            got = manager.restore(
                step, args=ocp.args.Composite(train=ocp.args.StandardRestore(target))
            )
        except Exception as err:  # noqa: BLE001 - report which step and why, in one line
            raise CheckpointError(f"{where}: unreadable ({one_line(err)})") from None
        verify({"train": got["train"]}, meta, where)
        return got["train"]["stats"]
    finally:
        manager.close()
