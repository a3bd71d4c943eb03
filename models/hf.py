"""Hugging Face checkpoint import/export: safetensors + config.json, never pickle.

``from_hf(path)`` reads a HF model directory (``model.safetensors`` or a sharded
``model.safetensors.index.json``) of a Llama, Qwen2, Mistral or DeepSeek-V2/V3 (dense layers)
model into a ``DecoderLM``; ``to_hf(model, path)`` writes one that ``transformers`` loads.
Missing, unexpected or mis-shaped tensors raise one ValueError listing all of them.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.layers import AdapterParam, Linear
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


# safetensors metadata key prefix under which ``to_hf`` stores each tensor's sha256
_DIGEST = "jaxattn.sha256."


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _stored_digests(tensors: dict[str, tuple]) -> dict[str, str]:
    """name -> sha256 hex for the tensors whose file carries ``to_hf``'s digests."""
    from safetensors import safe_open

    out = {}
    for file in sorted({file for file, _ in tensors.values()}):
        with safe_open(file, framework="numpy") as f:
            meta = f.metadata() or {}
        out |= {k[len(_DIGEST) :]: v for k, v in meta.items() if k.startswith(_DIGEST)}
    return out


def _read_checked(file: str, key: str, digests: dict[str, str]) -> np.ndarray:
    """A tensor, verified against its stored digest when the file has one."""
    a = _read(file, key)
    if key in digests and _digest(a) != digests[key]:
        raise ValueError(
            f"tensor {key!r} in {file} does not match its stored sha256: the file is "
            "corrupted (or was modified after export)"
        )
    return a


def _read_config(path: str, overrides: dict):
    """The ModelConfig of the HF directory ``path``; errors name the file and the field."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        with open(file) as f:
            hf_config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    try:
        return config_from_hf(hf_config, **overrides)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None


def from_hf(path: str, **config_overrides) -> DecoderLM:
    """Load a Hugging Face model directory into a DecoderLM.

    Args:
      path: directory with ``config.json`` and safetensors weights.
      **config_overrides: ModelConfig fields to override (e.g. ``dtype=jnp.bfloat16``,
        ``param_dtype=jnp.bfloat16``, ``implementation="xla"``).

    Returns:
      The DecoderLM with the checkpoint's weights (cast to ``param_dtype``).

    Raises:
      ValueError: unsupported config, or missing / unexpected / mis-shaped tensors (all listed).
      FileNotFoundError: no config.json or no safetensors weights.
    """
    config = _read_config(path, config_overrides)
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

    digests = _stored_digests(tensors)
    model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    values = {}
    for r in table:
        arrays = r.to_ours(*(_read_checked(tensors[n][0], n, digests) for n in r.hf))
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


def _export_values(model: DecoderLM, covered: set) -> dict:
    """Parameter path -> value to export, adapters merged into their kernels and factorised
    kernels (``Linear.form``: lowrank, sltrain, sst) exported as their dense product.

    Raises:
      ValueError: naming every parameter that cannot be exported: adapters that cannot be
        merged (or sit on a tied head, which HF ties to the embedding) and parameters no HF
        tensor holds.
    """
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    values = {p: v[...] for p, v in flat.items() if not isinstance(v, AdapterParam)}
    adapter_leaves = {p for p, v in flat.items() if isinstance(v, AdapterParam)}
    problems = []
    for path, linear in nnx.iter_modules(model):
        if isinstance(linear, Linear) and linear.form is not None:  # a factorised kernel
            values = {p: v for p, v in values.items() if p[: len(path) + 1] != (*path, "form")}
            values[(*path, "kernel")] = linear.effective_kernel()
        if not isinstance(linear, Linear) or linear.adapter is None:
            continue
        name = "/".join(map(str, path))
        adapter_leaves = {p for p in adapter_leaves if p[: len(path) + 1] != (*path, "adapter")}
        if linear.transposed:
            problems.append(f"{name}: an adapter on the tied head (HF ties lm_head to the table)")
            continue
        try:
            values[(*path, "kernel")] = linear.effective_kernel()
            if linear.bias is not None:
                values[(*path, "bias")] = linear.effective_bias()
        except NotImplementedError as err:
            problems.append(f"{name}: its adapter cannot be merged ({err})")
    uncovered = sorted("/".join(map(str, p)) for p in (set(values) - covered) | adapter_leaves)
    if uncovered:
        problems.append(f"parameters no Hugging Face tensor holds: {uncovered}")
    if problems:
        raise ValueError("cannot export to Hugging Face: " + "; ".join(problems))
    return values


def to_hf(model: DecoderLM, path: str, *, dtype=None) -> None:
    """Write ``model`` as a Hugging Face directory (config.json + model.safetensors).

    Adapters are merged into their kernels (``Linear.effective_kernel``); a model with anything
    the HF format cannot hold is refused, naming every such parameter. Each tensor's sha256 is
    stored in the safetensors metadata, and :func:`from_hf` verifies it.

    Args:
      model: the DecoderLM; ``model.config.arch`` picks the HF model type.
      path: output directory (created if needed).
      dtype: storage dtype (default the parameters' dtype), e.g. ``jnp.bfloat16``.
    """
    from safetensors.numpy import save_file

    config = model.config
    # the config first: a model the HF format cannot hold fails before any tensor work
    stored = jnp.dtype(config.param_dtype if dtype is None else dtype)
    hf_config = config_to_hf(config, torch_dtype=stored.name)
    table = rules(config)
    flat = _export_values(model, {p for r in table for p in r.paths})
    out = {}
    for r in table:
        arrays = r.to_hf(*(np.asarray(jax.device_get(flat[p])) for p in r.paths))
        for name, a in zip(r.hf, arrays, strict=True):
            out[name] = np.ascontiguousarray(a.astype(stored))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    digests = {_DIGEST + name: _digest(a) for name, a in out.items()}
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt", **digests})
