"""The training config: one frozen keyword-only dataclass, config files, and ``--set`` overrides.

An experiment config is a Python file under ``train/configs/`` that defines ``CONFIG``, a
:class:`TrainConfig` (its docstring holds the exact command line that runs it). On the command
line, ``--set key=value`` replaces single fields; values are parsed by the field's type, and an
unknown key or a bad value raises :class:`ConfigError` that names the key and the choices
(``--help`` lists every key with its type and default); ``--set model.FIELD=VALUE`` appends
``FIELD=VALUE`` to ``model_overrides`` (a field of the model config, e.g.
``model.parameterization=sltrain``). ``--config`` takes a path (relative to
the current directory, else to the repository / installed package, so
``--config train/configs/recall.py`` works from anywhere) or the bare name of a file in
``train/configs`` (``--config recall``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import typing

__all__ = [
    "ConfigError",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "config_from_argv",
    "resolve_config_path",
    "fields_help",
    "config_to_json",
    "config_from_json",
]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says which and why."""


_CHOICES = {
    "compute_dtype": ("float32", "bfloat16"),
    "remat": ("none", "blocks", "full"),
    "nonfinite": ("stop", "skip"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs; defaults are the CPU demo run (a few minutes).

    Data: ``data`` is ``"builtin"`` (stdlib-docstring corpus), ``"recall"`` (synthetic
    associative recall), or a path to a text file, a directory of ``.txt`` files or a ``.npy``
    array of token ids. Batch sizes are global (all hosts); ``grad_accum`` splits each batch
    into that many micro-batches. Mesh sizes of -1 take all remaining devices.

    Non-finite steps: with ``nonfinite="stop"`` training stops at the first step whose loss,
    gradient norm or updated parameters are not finite, naming it (nothing of that state is
    saved); ``"skip"`` leaves such a step's parameters and optimizer state unchanged instead
    (the data still advances) and counts it in the metrics (``skipped``).

    Resuming and ``overwrite``: a run directory holding an earlier run is resumed; fields that
    change what the run computes must equal the saved ones (see ``train.resume``), and
    nothing of the earlier run is deleted. ``overwrite=true`` deletes the earlier run's files
    and starts over.
    """

    name: str = "mla-tiny-default"
    model: str = "mla-tiny-default"
    model_overrides: tuple[str, ...] = ()  # "field=value" for the model config, e.g. "num_layers=2"
    # data
    data: str = "builtin"
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    eval_fraction: float = 0.05
    # optimisation
    steps: int = 120
    lr: float = 2e-3
    warmup_steps: int = 12
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    # weight of the layers' auxiliary losses (MoH load balance) in the objective; see train.step
    aux_loss_weight: float = 0.01
    compute_dtype: str = "float32"
    remat: str = "none"
    seed: int = 0
    # train steps per compiled call (a lax.scan over that many batches); see train.loop
    steps_per_call: int = 10
    # a step with a non-finite loss / gradient norm / update: "stop" the run or "skip" the step
    nonfinite: str = "stop"
    # ordered "factory(args):path-regex" rules; the first match picks each parameter's
    # optimizer, "frozen" ones do not train (see train.optim, train.optimizers)
    optimizer: tuple[str, ...] = ("adamw:.*",)
    init_from: str = ""
    adapter: str = ""  # a jaxattn.lowrank method ("lora", ...) attached by train.finetune
    adapter_options: tuple[str, ...] = ()  # its FIELD=VALUE options (--set adapter.FIELD=VALUE)
    # mesh
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    # multi-host: jax.distributed.initialize() when distributed is true
    distributed: bool = False
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    # evaluation, logging, checkpoints
    eval_every: int = 60
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 40
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    run_dir: str = ""
    resume: bool = True
    overwrite: bool = False  # delete an earlier run in run_dir and start over
    tensorboard: bool = True
    plot: bool = True
    sample_prompts: tuple[str, ...] = ("def ", "Return the ", "The ")
    sample_tokens: int = 80

    def __post_init__(self):
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {choices}")
        positive = (
            "seq_len",
            "batch_size",
            "grad_accum",
            "steps",
            "eval_batches",
            "log_every",
            "ckpt_every",
            "keep_checkpoints",
            "eval_every",
            "steps_per_call",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be positive")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}"
            )
        if not self.aux_loss_weight >= 0.0:
            raise ConfigError(f"aux_loss_weight={self.aux_loss_weight} must be >= 0")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be in (0, 1)")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"lr={self.lr} must be > 0 and min_lr_ratio={self.min_lr_ratio} in [0, 1]"
            )
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})"
            )
        for key in ("mesh_data", "mesh_fsdp", "mesh_tensor"):
            if getattr(self, key) == 0 or getattr(self, key) < -1:
                raise ConfigError(f"{key}={getattr(self, key)} must be positive or -1 (fill)")
        if [self.mesh_data, self.mesh_fsdp, self.mesh_tensor].count(-1) > 1:
            raise ConfigError("at most one of mesh_data, mesh_fsdp, mesh_tensor may be -1")
        self._check_optimizer_and_output()

    def _check_optimizer_and_output(self):
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} must be in [0, 1)")
        if not self.clip_norm > 0:
            raise ConfigError(f"clip_norm={self.clip_norm} must be > 0 (global-norm clipping)")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        from train.optim import parse_rule  # syntax and regexes; names are checked at build

        for rule in self.optimizer:
            parse_rule(rule)
        if self.sample_tokens < 0:
            raise ConfigError(f"sample_tokens={self.sample_tokens} must be >= 0")
        if any(not p for p in self.sample_prompts):
            raise ConfigError(f"sample_prompts={self.sample_prompts} must be non-empty strings")
        if not (self.run_dir or self.name):
            raise ConfigError("name='' needs run_dir=... (the run directory is runs/<name>)")
        if self.num_processes < 0 or self.process_id < -1:
            raise ConfigError(
                f"num_processes={self.num_processes} must be >= 0 (0: auto) and "
                f"process_id={self.process_id} >= -1 (-1: auto)"
            )

    @property
    def out_dir(self) -> str:
        """The run directory: ``run_dir`` or ``./runs/<name>``."""
        return self.run_dir or os.path.join("runs", self.name)

    def mesh_shape(self, num_devices: int) -> dict[str, int]:
        """Mesh axis sizes for ``num_devices`` devices, resolving a -1 entry.

        Raises:
          ConfigError: the sizes do not multiply to ``num_devices``.
        """
        shape = {"data": self.mesh_data, "fsdp": self.mesh_fsdp, "tensor": self.mesh_tensor}
        known = 1
        for size in shape.values():
            known *= size if size > 0 else 1
        for axis, size in shape.items():
            if size == -1:
                if num_devices % known:
                    raise ConfigError(
                        f"mesh {shape} cannot fill {num_devices} devices: the fixed sizes "
                        f"multiply to {known}, which does not divide {num_devices}"
                    )
                shape[axis] = num_devices // known
        total = shape["data"] * shape["fsdp"] * shape["tensor"]
        if total != num_devices:
            raise ConfigError(
                f"mesh_data={shape['data']} x mesh_fsdp={shape['fsdp']} x mesh_tensor="
                f"{shape['tensor']} needs {total} devices but {num_devices} "
                f"{'is' if num_devices == 1 else 'are'} present (-1 fills the rest)"
            )
        return shape


def split_list(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"galore(rank=4,scale=1):a{1,2},b"``
    gives ``["galore(rank=4,scale=1):a{1,2}", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += 1 if char in "([{" else -1 if char in ")]}" else 0
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]] if text else []


def _parse_value(key: str, text: str, kind) -> object:
    """Parse ``text`` as a value of the type ``kind`` of field ``key``."""
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"expected true/false, got {text!r}")
            return lowered in ("true", "1", "yes")
        if kind in (int, float, str):
            return kind(text)
        if typing.get_origin(kind) is tuple:
            return tuple(part for part in split_list(text) if part)
    except ValueError as err:
        raise ConfigError(f"--set {key}={text!r}: {err}") from None
    raise ConfigError(f"--set {key}: fields of type {kind} cannot be set from the command line")


def apply_overrides(config: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Return ``config`` with ``key=value`` overrides applied (types from the dataclass).

    Raises:
      ConfigError: a malformed override, an unknown key (with close matches), or a bad value.
    """
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key.startswith("model."):  # one field of the model config (model_overrides)
            overrides_ = changes.get("model_overrides", config.model_overrides)
            changes["model_overrides"] = (*overrides_, f"{key[len('model.') :]}={text}")
            continue
        if key.startswith("adapter."):  # one option of the adapter method (train.adapters)
            options = changes.get("adapter_options", config.adapter_options)
            changes["adapter_options"] = (*options, f"{key[len('adapter.') :]}={text}")
            continue
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=3)
            hint = f"; did you mean {close}?" if close else f"; known keys: {sorted(hints)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        changes[key] = _parse_value(key, text, hints[key])
    return dataclasses.replace(config, **changes)


def load_config(path: str | None = None, overrides=()) -> TrainConfig:
    """Load ``CONFIG`` from an experiment config file (default config if None), then override.

    Args:
      path: a Python file defining ``CONFIG: TrainConfig``, or None for the defaults.
      overrides: ``key=value`` strings.

    Returns:
      The validated config.

    Raises:
      ConfigError: missing file, no ``CONFIG`` in it, or bad overrides.
    """
    config = TrainConfig()
    if path:
        path = resolve_config_path(path)
        spec = importlib.util.spec_from_file_location("_train_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = getattr(module, "CONFIG", None)
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"{path} must define CONFIG = TrainConfig(...)")
    return apply_overrides(config, overrides)


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def resolve_config_path(path: str) -> str:
    """The config file ``path`` names: as given (relative to the current directory), else
    relative to the repository / installed package root, else a file in ``train/configs``
    (``"recall"`` or ``"recall.py"``).

    Raises:
      ConfigError: none of these exists (the message lists the files in train/configs).
    """
    name = path if path.endswith(".py") else path + ".py"
    for candidate in (path, os.path.join(_PACKAGE_ROOT, path), os.path.join(CONFIGS_DIR, name)):
        if os.path.isfile(candidate):
            return candidate
    known = sorted(n for n in os.listdir(CONFIGS_DIR) if n.endswith(".py") and n[0] != "_")
    raise ConfigError(
        f"--config {path!r} does not exist (looked in the current directory, under "
        f"{_PACKAGE_ROOT} and in train/configs: {', '.join(known)})"
    )


def _type_name(kind) -> str:
    if typing.get_origin(kind) is tuple:
        return "comma-separated list"
    return getattr(kind, "__name__", str(kind))


def fields_help() -> str:
    """Every ``--set`` key with its type, default and choices (generated from the dataclass)."""
    hints = typing.get_type_hints(TrainConfig)
    lines = ["--set keys (KEY=VALUE; lists are comma-separated, commas in brackets kept):"]
    for field in dataclasses.fields(TrainConfig):
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(default)
        extra = f"; one of {', '.join(_CHOICES[field.name])}" if field.name in _CHOICES else ""
        lines.append(
            f"  {field.name:20s} {_type_name(hints[field.name])}, default {default!r}{extra}"
        )
    return "\n".join(lines)


def config_from_argv(argv=None, description: str = "", prog: str | None = None) -> TrainConfig:
    """Parse ``[--config FILE] [--set key=value ...]`` into a config (see :func:`load_config`)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=None,
        help="experiment config: a file (train/configs/recall.py) or a name in train/configs",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field; repeatable",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="METHOD",
        help="attach a jaxattn.lowrank adapter (lora, dylora, ...); its fields: "
        "--set adapter.FIELD=VALUE (train.adapters)",
    )
    args = parser.parse_args(argv)
    sets = args.set if args.adapter is None else [f"adapter={args.adapter}", *args.set]
    return load_config(args.config, sets)


# dataclasses a checkpoint's JSON may name (nothing else is imported from metadata)
_TRUSTED_MODULES = ("models.", "jaxattn.", "train.")


def config_to_json(obj):
    """JSON-able form of a (nested) config dataclass; dtypes become ``{"__dtype__": name}``."""
    import jax.numpy as jnp  # here: the config module itself loads without JAX

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
    import jax.numpy as jnp

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
