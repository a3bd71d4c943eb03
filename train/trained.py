"""Trained test models: small models made by ``train.pretrain`` whose heads have known roles.

The weights are committed under ``train/weights/<name>/``: ``model.safetensors`` (every
``nnx.Param`` by its path, ``layers/0/attn/q/kernel``, fp32; the ``models.ModelConfig`` as JSON
in its metadata; not the HF format, which has no per-layer sliding window for Llama) and a
``manifest.json``: the exact command that regenerates them, the hash of the
training config they came from, the file's sha256 and the accuracy measured at export. Tests,
notebooks, benchmarks and the KV-cache issues load them with :func:`load_trained`.

    heads-recall   2 layers x 8 heads Llama (MHA), associative recall (train.data.RecallLoader)
                   ``train/configs/heads_recall.py``; its layer-1 heads retrieve the value.

Regenerate (a few CPU minutes), then export the run into ``train/weights``:

    python -m train.pretrain --config train/configs/heads_recall.py
    python -m train.trained export heads-recall runs/heads-recall
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TRAINED",
    "stored_model_config",
    "weights_dir",
    "load_trained",
    "read_manifest",
    "train_config",
    "config_hash",
    "eval_batch",
    "recall_accuracy",
    "export_trained",
]

# name -> the experiment config file (under train/configs) that trains it
TRAINED = {"heads-recall": "heads_recall.py"}
_ROOT = os.path.dirname(os.path.abspath(__file__))


def _check(name: str) -> None:
    if name not in TRAINED:
        raise ValueError(f"unknown trained model {name!r}; known: {sorted(TRAINED)}")


def weights_dir(name: str) -> str:
    """The committed directory of trained model ``name`` (``train/weights/<name>``)."""
    _check(name)
    return os.path.join(_ROOT, "weights", name.replace("-", "_"))


def train_config(name: str):
    """The :class:`train.config.TrainConfig` that trains ``name``."""
    from train.config import load_config

    _check(name)
    return load_config(os.path.join(_ROOT, "configs", TRAINED[name]))


def config_hash(config) -> str:
    """sha256 of a training config's canonical JSON (``train.config.config_to_json``)."""
    from train.config import config_to_json

    text = json.dumps(config_to_json(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_manifest(name: str) -> dict:
    """The committed ``manifest.json`` of ``name`` (command, hashes, accuracy at export)."""
    with open(os.path.join(weights_dir(name), "manifest.json")) as f:
        return json.load(f)


def load_trained(name: str, **config_overrides):
    """The committed trained model ``name`` as a ``models.DecoderLM`` (fp32 parameters).

    Args:
      name: one of :data:`TRAINED`.
      config_overrides: ModelConfig fields to change (e.g. ``implementation="xla"``).

    Raises:
      ValueError: an unknown name, a weights file whose sha256 differs from its manifest, or
        tensors that do not match the stored model config (missing, extra, mis-shaped).
    """
    from flax import nnx
    from safetensors.numpy import load_file

    from models import DecoderLM

    file = os.path.join(weights_dir(name), "model.safetensors")
    want = read_manifest(name)["safetensors_sha256"]
    got = _file_sha256(file)
    if got != want:
        raise ValueError(f"{file} sha256 {got} != manifest's {want}")
    config = dataclasses.replace(stored_model_config(name), **config_overrides)
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    tensors = load_file(file)
    params = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    problems = sorted(set(params) ^ set(tensors))
    problems += [f"{k}: {tensors[k].shape} != {params[k].shape}" for k in sorted(params)
                 if k in tensors and tuple(tensors[k].shape) != tuple(params[k].shape)]  # fmt: skip
    if problems:
        raise ValueError(f"{file} does not match its model config: {problems}")
    for k, var in params.items():
        var.set_value(jnp.asarray(tensors[k], var.get_value().dtype))
    return model


def stored_model_config(name: str):
    """The ``models.ModelConfig`` stored in ``name``'s safetensors metadata."""
    from safetensors import safe_open

    from train.config import config_from_json

    with safe_open(os.path.join(weights_dir(name), "model.safetensors"), "numpy") as f:
        meta = f.metadata()
    return config_from_json(json.loads(meta["jaxattn.model_config"]))


def eval_batch(name: str, batch_size: int = 256, step: int = 0) -> dict:
    """A held-out batch of ``name``'s task (the eval stream of ``train.data.make_loaders``)."""
    from train.data import make_loaders

    config = dataclasses.replace(train_config(name), batch_size=batch_size)
    return make_loaders(config)[1].batch(step)


def recall_accuracy(logits_BTV, batch: dict) -> float:
    """Fraction of scored positions (``weights_BT > 0``) whose argmax logit is the target."""
    w_BT = jnp.asarray(batch["weights_BT"]) > 0
    hit_BT = jnp.argmax(logits_BTV, axis=-1) == jnp.asarray(batch["targets_BT"])
    return float(jnp.sum(hit_BT & w_BT) / jnp.sum(w_BT))


def export_trained(name: str, run_dir: str) -> dict:
    """Write the newest checkpoint of ``run_dir`` (trained by ``name``'s config) to
    ``weights_dir(name)`` with its manifest; returns the manifest.

    Raises:
      ValueError: the run was trained with another config than ``name``'s current one.
    """
    from flax import nnx
    from safetensors.numpy import save_file

    from train.config import config_to_json
    from train.sample import load_model

    model, meta = load_model(run_dir)
    config = train_config(name)
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    differ = sorted(k for k, v in wanted.items() if k not in _OUTPUT_ONLY
                    and meta["config"].get(k) != v)  # fmt: skip
    if differ:
        raise ValueError(
            f"{run_dir} was not trained with train/configs/{TRAINED[name]}: fields {differ} differ"
        )
    path = weights_dir(name)
    os.makedirs(path, exist_ok=True)
    flat = {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}  # fmt: skip
    meta_json = json.dumps(config_to_json(model.config), sort_keys=True)
    save_file(flat, os.path.join(path, "model.safetensors"),
              metadata={"jaxattn.model_config": meta_json})  # fmt: skip
    batch = eval_batch(name)
    accuracy = recall_accuracy(jax.jit(lambda t: model(t))(batch["inputs_BT"]), batch)
    manifest = {
        "name": name,
        "command": [
            f"python -m train.pretrain --config train/configs/{TRAINED[name]}",
            f"python -m train.trained export {name} runs/{config.name}",
        ],
        "train_config": TRAINED[name],
        "train_config_sha256": config_hash(config),
        "step": int(meta["step"]),
        "safetensors_sha256": _file_sha256(os.path.join(path, "model.safetensors")),
        "recall_accuracy": round(accuracy, 4),
        "eval": "eval_batch(name, 256, 0): 256 held-out rows",
    }
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


# fields that say where and how a run writes, not what it trains
_OUTPUT_ONLY = ("run_dir", "resume", "overwrite", "async_checkpoint", "tensorboard", "plot")


def main(argv=None) -> None:
    """``python -m train.trained export NAME RUN_DIR``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "export":
        raise SystemExit(f"usage: python -m train.trained export {{{','.join(TRAINED)}}} RUN_DIR")
    manifest = export_trained(argv[1], argv[2])
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
