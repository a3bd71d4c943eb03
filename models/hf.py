"""Hugging Face checkpoint import/export: safetensors + config.json, never pickle.

``from_hf(path)`` reads a HF model directory (``model.safetensors`` or a sharded
``model.safetensors.index.json``) of a Llama, Qwen2, Mistral or DeepSeek-V2/V3 (dense layers)
model into a ``DecoderLM``; ``to_hf(model, path)`` writes one that ``transformers`` loads.
Missing, unexpected or mis-shaped tensors raise one ValueError listing all of them.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models._hf_config import config_from_hf, config_to_hf
from models._hf_maps import HF_IGNORED_SUFFIXES, rules
from models.decoder import DecoderLM

__all__ = ["from_hf", "to_hf"]


def _open_tensors(path: str) -> dict[str, tuple]:
    """name -> (file, shape) for every tensor of the checkpoint at ``path``."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {path}"
            " (pickled .bin checkpoints are not read)"
        )
    out = {}
    for name in files:
        file = os.path.join(path, name)
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():
                out[key] = (file, tuple(f.get_slice(key).get_shape()))
    return out


def _read(file: str, key: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(file, framework="numpy") as f:
        return f.get_tensor(key)


def from_hf(path: str, **config_overrides) -> DecoderLM:
    """Load a Hugging Face model directory into a DecoderLM.

    Args:
      path: directory with ``config.json`` and safetensors weights.
      **config_overrides: ModelConfig fields to override (e.g. ``dtype=jnp.bfloat16``,
        ``param_dtype=jnp.bfloat16``, ``attention_impl="xla"``).

    Returns:
      The DecoderLM with the checkpoint's weights (cast to ``param_dtype``).

    Raises:
      ValueError: unsupported config, or missing / unexpected / mis-shaped tensors (all listed).
      FileNotFoundError: no config.json or no safetensors weights.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    config = config_from_hf(hf_config, **config_overrides)
    tensors = _open_tensors(path)
    table = rules(config)
    expected = {name: shape for r in table for name, shape in zip(r.hf, r.hf_shapes, strict=True)}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports write the tied copy too
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(
        n for n in set(tensors) - set(expected) if not n.endswith(HF_IGNORED_SUFFIXES)
    )
    misshaped = sorted(
        f"{n}: file {tensors[n][1]}, expected {s}"
        for n, s in expected.items()
        if n in tensors and tensors[n][1] != s
    )
    if missing or unexpected or misshaped:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing={missing} "
            f"unexpected={unexpected} misshaped={misshaped}"
        )

    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    values = {}
    for r in table:
        arrays = r.to_ours(*(_read(tensors[n][0], n) for n in r.hf))
        for p, a in zip(r.paths, arrays, strict=True):
            var = flat[p]
            if tuple(a.shape) != tuple(var.shape):
                raise ValueError(
                    f"converted {r.hf} -> {p} has shape {a.shape}, expected {var.shape}"
                )
            values[p] = var.replace(jnp.asarray(np.asarray(a), dtype=var.dtype))
    left = sorted(set(flat) - set(values))
    if left:
        raise ValueError(f"parameters not covered by the HF mapping: {left}")
    return nnx.merge(graphdef, nnx.from_flat_state(list(values.items())))


def to_hf(model: DecoderLM, path: str, *, dtype=None) -> None:
    """Write ``model`` as a Hugging Face directory (config.json + model.safetensors).

    Args:
      model: the DecoderLM; ``model.config.arch`` picks the HF model type.
      path: output directory (created if needed).
      dtype: storage dtype (default the parameters' dtype), e.g. ``jnp.bfloat16``.
    """
    from safetensors.numpy import save_file

    config = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for r in rules(config):
        arrays = r.to_hf(*(np.asarray(jax.device_get(flat[p][...])) for p in r.paths))
        for name, a in zip(r.hf, arrays, strict=True):
            a = np.ascontiguousarray(a if dtype is None else a.astype(jnp.dtype(dtype)))
            out[name] = a
    stored = jnp.dtype(dtype) if dtype is not None else next(iter(out.values())).dtype
    hf_config = config_to_hf(config, torch_dtype=jnp.dtype(stored).name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
