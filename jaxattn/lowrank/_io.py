"""Saving and loading one named adapter: ``adapter.safetensors`` + ``adapter_config.json``.

The tensors file holds every parameter of adapter ``name`` under flat keys
``<projection path>/<param path>`` (``layers/0/attn/q/a``), fp32 as stored, and a trained bias
change (``bias="lora_only"``) under ``<projection path>/:bias``. The JSON holds the
``AdapterConfig``, the method fields each path was built with, and a fingerprint of the base
model: ``{path: [in_shape, out_shape]}`` of every adapted projection.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.layers import AdapterParam
from jaxattn.lowrank._apply import AdapterConfig, apply, holding
from jaxattn.lowrank._surgery import linear_paths

__all__ = ["save", "load"]


def _st():
    try:
        import safetensors.numpy as st
    except ImportError as err:  # an optional dependency (the ``hf`` extra)
        msg = "lowrank.save / load need safetensors: pip install 'jaxattn[hf]'"
        raise ImportError(msg) from err
    return st


TENSORS, CONFIG = "adapter.safetensors", "adapter_config.json"
BIAS_KEY = ":bias"  # not a parameter name (no module attribute starts with ':')


def _flat(adapter) -> dict[str, AdapterParam]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(adapter, AdapterParam)):
        out["/".join(str(p) for p in path)] = var
    return out


def save(model: nnx.Module, directory: str, name: str = "default", *, config=None) -> list[str]:
    """Write adapter ``name`` of ``model`` to ``directory``; returns the saved paths.

    Args:
      config: the ``AdapterConfig`` it was applied with (recorded; default: the one ``apply``
        kept on the model for ``name``).

    Raises:
      ValueError: no projection holds ``name``, or it is merged (unmerge first).
    """
    tensors, fields, shapes = {}, {}, {}
    for path, linear in holding(model, name, op="save").items():
        s = linear.adapter
        if getattr(s.adapters[name], "shared_a", None) is not None:  # _peft_randlora
            raise ValueError(
                f"save: {name!r} at {path!r} holds PEFT's RandLoRA bases, which this format "
                "does not store (it regenerates bases from a key); write it with "
                "lowrank.to_peft"
            )
        for key, var in _flat(s.adapters[name]).items():
            tensors[f"{path}/{key}"] = np.asarray(var[...])
        if name in s.bias_deltas:
            tensors[f"{path}/{BIAS_KEY}"] = np.asarray(s.bias_deltas[name][...])
        saved_cfg, method = s.record(name)
        fields[path] = method.to_json()
        shapes[path] = [list(linear.in_shape), list(linear.out_shape)]
        cfg = config or saved_cfg
    os.makedirs(directory, exist_ok=True)
    _st().save_file(tensors, os.path.join(directory, TENSORS))
    meta = {"config": cfg.to_json(), "methods": fields, "base_shapes": shapes}
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return list(fields)


def load(model: nnx.Module, directory: str, *, name: str | None = None) -> list[str]:
    """Attach the adapter saved in ``directory`` (under its saved name, or ``name``) and fill
    its parameters; returns the paths. Init-time base changes (PiSSA / OLoRA) are *not*
    re-applied: load into the base the adapter was trained on.

    Raises:
      ValueError: the saved projections or shapes do not match ``model`` (every mismatch
        listed), or a tensor is missing / of the wrong shape.
    """
    with open(os.path.join(directory, CONFIG)) as f:
        meta = json.load(f)
    tensors = _st().load_file(os.path.join(directory, TENSORS))
    found = linear_paths(model)
    bad = []
    for path, (ins, outs) in meta["base_shapes"].items():
        if path not in found:
            bad.append(f"{path}: not a projection of {type(model).__name__}")
        elif [list(found[path].in_shape), list(found[path].out_shape)] != [ins, outs]:
            lin = found[path]
            bad.append(
                f"{path}: saved {ins}->{outs}, model {list(lin.in_shape)}->{list(lin.out_shape)}"
            )
    if bad:
        raise ValueError(
            "load: the base model does not match the saved adapter:\n  " + "\n  ".join(bad)
        )
    c = dict(meta["config"])
    if name is not None:
        c["name"] = name
    # rebuild exactly the saved paths with their saved fields; no base rewrite on load
    paths = list(meta["methods"])
    overrides = {
        f"^{_esc(p)}$": {k: v for k, v in m.items() if k != "method"}
        for p, m in meta["methods"].items()
    }
    for m in overrides.values():
        if m.get("init") in ("pissa", "olora"):
            m["init"] = "zero"
    cfg = AdapterConfig(
        method=c["method"],
        options={},
        targets=[f"^{_esc(p)}$" for p in paths],
        overrides=overrides,
        name=c["name"],
        bias=c.get("bias", "none"),
    )
    done = apply(model, cfg, rngs=nnx.Rngs(0))
    errs = []
    for path in done:
        s = found[path].adapter
        saved = dict(meta["methods"][path])
        s.records = tuple(
            (n, json.dumps(c), json.dumps(saved)) if n == cfg.name else (n, cj, mj)
            for n, cj, mj in s.records
        )
        params = dict(_flat(s.adapters[cfg.name]))
        if cfg.name in s.bias_deltas:
            params[BIAS_KEY] = s.bias_deltas[cfg.name]
        for key, var in params.items():
            arr = tensors.get(f"{path}/{key}")
            if arr is None:
                errs.append(f"{path}/{key}: missing")
            elif arr.shape != tuple(var.shape):
                errs.append(f"{path}/{key}: saved {arr.shape}, expected {tuple(var.shape)}")
            else:
                var[...] = jnp.asarray(arr, var.dtype)
    if errs:
        raise ValueError("load: tensors do not match:\n  " + "\n  ".join(errs))
    return done


def _esc(path: str) -> str:
    import re

    return re.escape(path)
