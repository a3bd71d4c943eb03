"""Optimizer: AdamW with warmup + cosine decay and global-norm clipping, on a trainable subset.

Which parameters train is decided by regular expressions over parameter paths, the
``/``-joined keys of the model's ``nnx.to_pure_dict`` parameters (``"layers/0/attn/q/kernel"``,
``"embed/..."``; patterns such as ``r"^layers/0/"`` select a whole block): a parameter trains
when a ``trainable`` pattern matches (``re.search``) and no ``frozen`` pattern does. The same
patterns serve as an NNX filter (:func:`path_filter`, for ``nnx.state(model, filter)``) and as
optax labels (:func:`param_labels`, for ``optax.multi_transform``), so low-rank adapters plug
in by passing ``trainable=(r"lora_",)``. Frozen parameters get zero updates and carry no
optimizer state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax

__all__ = [
    "path_string",
    "is_trainable",
    "path_filter",
    "param_labels",
    "lr_schedule",
    "make_optimizer",
]


def path_string(path) -> str:
    """``"a/b/0/c"`` for a pytree key path or an NNX path tuple."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        parts.append(str(key))
    return "/".join(parts)


def is_trainable(path: str, trainable: Sequence[str], frozen: Sequence[str]) -> bool:
    """Whether the parameter at ``path`` trains under the ``trainable``/``frozen`` patterns."""
    return any(re.search(p, path) for p in trainable) and not any(
        re.search(p, path) for p in frozen
    )


def path_filter(trainable: Sequence[str] = (".*",), frozen: Sequence[str] = ()):
    """An NNX filter ``(path, value) -> bool`` selecting the trainable parameters.

    Usage: ``nnx.state(model, nnx.All(nnx.Param, path_filter(("lora_",))))``.
    """
    return lambda path, value: is_trainable(path_string(path), trainable, frozen)


def param_labels(params, trainable: Sequence[str] = (".*",), frozen: Sequence[str] = ()):
    """A pytree like ``params`` with ``"trainable"`` or ``"frozen"`` at every leaf.

    Raises:
      ConfigError: (a ValueError) the patterns select no parameter at all (almost surely a
        typo).
    """
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: (
            "trainable" if is_trainable(path_string(path), trainable, frozen) else "frozen"
        ),
        params,
    )
    if "trainable" not in jax.tree.leaves(labels):
        from train.config import ConfigError  # a ValueError naming the config fields

        raise ConfigError(
            f"trainable={tuple(trainable)} frozen={tuple(frozen)} select no "
            "parameter; paths look like "
            f"{[path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)[:3]]}"
        )
    return labels


def lr_schedule(config) -> optax.Schedule:
    """Linear warmup to ``lr`` over ``warmup_steps``, cosine decay to ``lr * min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.lr * config.min_lr_ratio,
    )


def make_optimizer(config, params) -> optax.GradientTransformation:
    """The optimizer for ``params`` (a pytree of fp32 master weights) under ``config``.

    Weight decay applies to matrices only (ndim >= 2), not to norms' scales or biases.
    Clipping sees only the trainable gradients.

    Args:
      config: a :class:`train.config.TrainConfig`.
      params: the parameter pytree (arrays or shape structs), for the labels.

    Returns:
      An ``optax.GradientTransformation``.
    """
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    train_tx = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            lr_schedule(config),
            b1=config.b1,
            b2=config.b2,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )
    labels = param_labels(params, config.trainable, config.frozen)
    return optax.multi_transform({"trainable": train_tx, "frozen": optax.set_to_zero()}, labels)
