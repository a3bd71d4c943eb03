"""A layer's parameters as plain float64 arrays, the form every conversion reads and returns.

``layer_params(module)`` reads each ``Linear`` through ``effective_kernel`` / ``effective_bias``
(adapters folded in, DESIGN.md Extension point 1) and each norm's scale, as a nested dict keyed
by the module's parameter paths: ``{"q": {"kernel": [D, N, H], "bias": [N, H]}, "o": {...}}``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.layers import Linear, RMSNorm

__all__ = ["layer_params", "load_layer_params"]


def layer_params(module: nnx.Module) -> dict:
    """{submodule name: {"kernel" / "bias" / "scale": float64 array}} of ``module``."""
    out: dict = {}
    for path, m in nnx.iter_modules(module):
        if not path:
            continue
        name = "/".join(map(str, path))
        if isinstance(m, Linear):
            entry = {"kernel": np.asarray(m.effective_kernel(), np.float64)}
            bias = m.effective_bias()
            if bias is not None:
                entry["bias"] = np.asarray(bias, np.float64)
            out[name] = entry
        elif isinstance(m, RMSNorm):
            out[name] = {"scale": np.asarray(m.scale[...], np.float64)}
    return out


def load_layer_params(module: nnx.Module, params: dict) -> None:
    """Write ``params`` (as :func:`layer_params` gives them) into ``module``'s parameters, in
    place, cast to each parameter's dtype; every parameter must be given, with its shape.

    Raises:
      ValueError: a missing, unexpected or mis-shaped entry (all listed).
    """
    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    given = {(*name.split("/"), key): v for name, e in params.items() for key, v in e.items()}
    ours = {tuple(map(str, p)): p for p in flat}
    problems = sorted(set(map("/".join, given)) ^ set(map("/".join, ours)))
    problems += [
        f"{'/'.join(k)}: {np.shape(v)} != {flat[ours[k]].shape}"
        for k, v in given.items()
        if k in ours and tuple(np.shape(v)) != tuple(flat[ours[k]].shape)
    ]
    if problems:
        raise ValueError(f"params do not match the module's parameters: {problems}")
    for k, v in given.items():
        var = flat[ours[k]]
        var.set_value(jnp.asarray(v, var.dtype))


def augmented(entry: dict, out_shape: tuple[int, ...]) -> np.ndarray:
    """A Linear's [kernel; bias] as [D + 1, *out] (a zero bias row when it has none)."""
    w = entry["kernel"]
    b = entry.get("bias", np.zeros(out_shape))
    return np.concatenate([w, np.asarray(b, np.float64).reshape(1, *out_shape)], axis=0)


def split_augmented(w_aug: np.ndarray, bias: bool) -> dict:
    """{"kernel": w_aug[:-1], "bias": w_aug[-1]} (no bias entry when ``bias`` is False)."""
    return {"kernel": w_aug[:-1], "bias": w_aug[-1]} if bias else {"kernel": w_aug[:-1]}
