"""Sampling entry point: ``python -m train.sample --checkpoint DIR --prompt "..."``.

Loads the parameters of a checkpoint written by ``train.pretrain``/``train.finetune`` (the
run directory or its ``checkpoints/`` folder), rebuilds the model from the config stored with
it, and generates with the KV cache through ``jaxattn.generate.generate``. Text is byte-level
(vocab 256). The parameters are verified against their stored checksums before use: a
corrupted checkpoint stops with ``checkpoint error:`` naming the step directory and the
parameters (exit code 1); bad flags stop with ``config error:`` (exit code 2).

``--set cache.FIELD=VALUE`` (repeatable) sets ``jaxattn.cache.CacheConfig`` fields over every
layer's cache config for this run, e.g. 2-bit KIVI caches:
``python -m train.sample --checkpoint RUN --prompt "..." --set cache.format=kivi
--set cache.bits=2 --set cache.group_size=32 --set cache.residual=128``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from train.cli import guarded
from train.data import ByteTokenizer
from train.optim import path_string
from train.platform import configure_cpu

__all__ = ["sample_texts", "load_model", "resolve_checkpoint", "cache_fields", "main"]


def sample_texts(
    model,
    prompts: list[str],
    *,
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cache: dict | None = None,
) -> list[str]:
    """Continue each prompt by ``max_new_tokens`` byte tokens.

    Args:
      model: an NNX language model accepted by ``jaxattn.generate.generate``.
      prompts: non-empty prompt strings (right-padded into one batch).
      max_new_tokens: tokens to generate per prompt.
      seed: sampling seed; temperature 0 is greedy.
      cache: CacheConfig fields set over every layer's cache (``generate(cache=)``).

    Returns:
      The generated continuations (without their prompts).
    """
    from jaxattn.generate import generate

    tok = ByteTokenizer()
    ids = [tok.encode(p) for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise ValueError("prompts must be non-empty")
    lengths_B = np.array([len(i) for i in ids], np.int32)
    prompt_BT = np.zeros((len(ids), int(lengths_B.max())), np.int32)
    for b, i in enumerate(ids):
        prompt_BT[b, : len(i)] = i
    out = generate(
        model,
        prompt_BT,
        lengths_B,
        max_new_tokens=max_new_tokens,
        rng=jax.random.key(seed),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cache=cache,
    )
    tokens_BS, end_B = np.asarray(out.tokens_BS), np.asarray(out.lengths_B)
    return [tok.decode(tokens_BS[b, lengths_B[b] : end_B[b]]) for b in range(len(ids))]


def _model_config(meta: dict):
    """The ``models.ModelConfig`` stored in checkpoint metadata (else rebuilt from the stored
    train config: its model name and overrides)."""
    from train.checkpoints import config_from_json

    if meta.get("model_config"):
        return config_from_json(meta["model_config"])
    from train.pretrain import build_model

    return build_model(_saved_train_config(meta))[0]


def _saved_train_config(meta: dict):
    """The ``TrainConfig`` stored in checkpoint metadata (fields it no longer has dropped)."""
    from train.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()
              if k in known}  # fmt: skip
    return TrainConfig(**fields)


def _train_config(meta: dict):
    """The stored train config of a run that attached an adapter (else None)."""
    if not (meta.get("config") or {}).get("adapter"):
        return None
    return _saved_train_config(meta)


def resolve_checkpoint(path: str, *, flag: str = "--checkpoint") -> str:
    """The checkpoint root of a run directory (its ``checkpoints/``) or of ``path`` itself.

    Raises:
      ConfigError: ``path`` is missing or holds no checkpoint steps (naming ``flag``).
    """
    from train.checkpoints import list_steps
    from train.config import ConfigError

    named = f"{flag} {path!r}" if flag.startswith("-") else f"{flag}={path!r}"
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a directory"
        raise ConfigError(f"{named} {what}")
    root = os.path.join(path, "checkpoints")
    root = root if os.path.isdir(root) else path
    if not list_steps(root):
        raise ConfigError(
            f"{named} holds no checkpoint steps (expected a run directory written by "
            "train.pretrain / train.finetune, or its checkpoints/ folder)"
        )
    return root


def load_model(checkpoint: str, step: int | None = None):
    """A ``models.DecoderLM`` holding a checkpoint's verified parameters, on the default device.

    Args:
      checkpoint: a run directory or its ``checkpoints/`` folder.
      step: the step to load (default the newest).

    Returns:
      ``(model, meta)``.

    Raises:
      FileNotFoundError: no checkpoint (or no such step).
      CheckpointError: the step cannot be read or fails its integrity check.
    """
    from models import DecoderLM
    from train.checkpoints import read_meta, restore_params

    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
        checkpoint = os.path.join(checkpoint, "checkpoints")
    meta = read_meta(checkpoint, step)
    model_config = _model_config(meta)
    adapter_run = _train_config(meta)

    def build():  # the model the checkpoint was trained as: with its run's adapter, if any
        model = DecoderLM(model_config, rngs=nnx.Rngs(0))
        if adapter_run is not None:
            from train.adapters import attach_adapter

            attach_adapter(model, adapter_run)
        return model

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    abs_params = nnx.to_pure_dict(abs_params)
    if "base" in meta:  # a fine-tuning checkpoint: its trainable leaves + a reference
        params, meta = _restore_finetuned(checkpoint, abs_params, meta)
    else:
        params, meta = restore_params(checkpoint, abs_params, step=meta["step"])

    @jax.jit
    def fresh_rest():  # non-parameter state (rng streams, tables); params are dead code here
        with nnx.use_eager_sharding(False):
            model = build()
        return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])

    model = nnx.merge(graphdef, params, fresh_rest())
    stats = nnx.state(model, nnx.BatchStat)  # tracked statistics (DGQA's EMA): as trained
    if stats:
        from train.checkpoints import restore_stats

        saved = restore_stats(checkpoint, meta["step"])
        if saved is not None:
            nnx.replace_by_pure_dict(stats, saved)
            nnx.update(model, stats)
    return model, meta


def _restore_finetuned(checkpoint: str, abs_params: dict, meta: dict):
    """A fine-tuning checkpoint's leaves merged over its base (``meta["base"]``), verified.

    Raises:
      CheckpointError: the base is missing or is not the one the run started from.
      ValueError: the checkpoint holds leaves the model config does not build (adapters
        attached in code), named.
    """
    from train.checkpoints import CheckpointError, restore_params
    from train.finetune import load_init, start_params
    from train.integrity import tree_digest
    from train.optim import merge_params, split_params

    ref, stored = meta["base"], set(meta["leaf_checksums"]["params"])
    where = f"{checkpoint} step {meta['step']}"
    known = set(path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(abs_params))
    if stored - known:
        raise ValueError(f"{where} holds parameters its model config does not build (adapters "
                         f"attached in code?): {sorted(stored - known)[:6]}")  # fmt: skip
    run_config = _train_config(meta)
    try:  # an adapter method's start callbacks (train.finetune.start_params) are repeated
        if run_config is None:
            _, base = load_init(ref["init_from"])
        else:
            base = start_params(run_config).params
    except Exception as err:  # noqa: BLE001 - the reference cannot be followed
        msg = f"{where}: its base {ref['init_from']!r} cannot be read ({err})"
        raise CheckpointError(msg) from None
    if tree_digest(base) != ref["digest"]:
        raise CheckpointError(
            f"{where}: its base {ref['init_from']!r} changed since the run started (digest "
            f"{tree_digest(base)} != {ref['digest']})"
        )
    own, meta = restore_params(checkpoint, split_params(abs_params, stored)[0], step=meta["step"])
    base = jax.device_put(split_params(base, known - stored)[0], jax.devices()[0])
    return merge_params(own, base), meta


def _load_adapter(model, directory: str) -> None:
    """Attach the adapter saved in ``directory`` (``--adapter``) to ``model``."""
    from jaxattn import lowrank
    from train.config import ConfigError

    if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
        raise ConfigError(f"--adapter {directory!r} holds no adapter_config.json (lowrank.save)")
    try:
        lowrank.load(model, directory)
    except ValueError as err:
        raise ConfigError(f"--adapter {directory!r}: {err}") from None


def _check_args(args) -> None:
    """Sampling flags that cannot work, as a ConfigError naming the flag."""
    from train.config import ConfigError

    if any(not p for p in args.prompt):
        raise ConfigError("--prompt must be non-empty")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature} must be >= 0 (0: greedy)")
    if args.top_k is not None and not 1 <= args.top_k <= ByteTokenizer.vocab_size:
        raise ConfigError(f"--top-k {args.top_k} must be in [1, {ByteTokenizer.vocab_size}]")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p} must be in (0, 1]")


def cache_fields(items) -> dict | None:
    """``["cache.format=kivi", "cache.bits=2"]`` -> ``{"format": "kivi", "bits": 2}`` (None
    when empty), checked by building the ``CacheConfig``.

    Raises:
      ConfigError: an item that is not ``cache.FIELD=VALUE``, an unknown field, a bad value.
    """
    import dataclasses as dc

    from jaxattn.cache import CacheConfig
    from train.config import ConfigError

    names = {f.name: f for f in dc.fields(CacheConfig)}
    ints = ("sink", "window", "bits", "group_size", "residual", "important", "fp_sinks", "rank")
    floats = ("outliers",)
    fields = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.startswith("cache."):
            raise ConfigError(f"--set {item!r} must look like cache.FIELD=VALUE")
        name = key[len("cache.") :]
        if name not in names:
            raise ConfigError(f"--set {key}: CacheConfig has no field {name!r}; {sorted(names)}")
        if text.strip().lower() in ("none", "null"):
            fields[name] = None
        elif name in ints:
            try:
                fields[name] = int(text)
            except ValueError:
                raise ConfigError(f"--set {key}={text!r} must be an int") from None
        elif name in floats:
            try:
                fields[name] = float(text)
            except ValueError:
                raise ConfigError(f"--set {key}={text!r} must be a number") from None
        else:
            fields[name] = text.strip()
    if not fields:
        return None
    try:
        CacheConfig(**fields)
    except ValueError as err:
        raise ConfigError(f"--set cache.*: {err}") from None
    return fields


def main(argv=None) -> None:
    """Command-line entry point (errors: see ``train.cli``)."""
    parser = argparse.ArgumentParser(
        prog="python -m train.sample", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--checkpoint", required=True, help="run dir or its checkpoints/ dir")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="default: the newest")
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="attach an adapter saved by jaxattn.lowrank.save (a fine-tuning run's adapter/)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="cache.FIELD=VALUE",
        help="a CacheConfig field for every layer's cache (repeatable): cache.format=kivi",
    )
    args = parser.parse_args(argv)
    configure_cpu()  # before any JAX computation: XLA reads its flags once
    guarded(lambda: _sample(args))


def _sample(args) -> None:
    from train.checkpoints import list_steps
    from train.config import ConfigError

    _check_args(args)
    cache = cache_fields(args.set)
    root = resolve_checkpoint(args.checkpoint)
    steps = list_steps(root)
    if args.step is not None and args.step not in steps:
        raise ConfigError(f"--step {args.step}: {args.checkpoint!r} holds steps {steps}")
    model, meta = load_model(root, args.step)
    if args.adapter is not None:
        _load_adapter(model, args.adapter)
    if cache is not None:
        try:  # every layer can serve the fields (checked before any compile)
            jax.eval_shape(lambda: model.init_cache(1, 1, cache=cache))
        except ValueError as err:
            raise ConfigError(f"--set cache.*: {err}") from None
    texts = sample_texts(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cache=cache,
    )
    print(f"checkpoint step {meta['step']}")
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"{prompt}{text}")


if __name__ == "__main__":
    main()
