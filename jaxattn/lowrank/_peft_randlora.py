"""PEFT RandLoRA interchange (peft 0.21.2, ``peft_type: "RANDLORA"``), used by ``_peft``.

peft keeps ONE pair of random bases for all adapted modules, sized for the largest ones, and
slices it per module (``RandLoraLayer.get_scaled_bases``); with ``save_projection=true`` (the
default) the file holds them, keys prefixed ``base_model.model.`` except the shared pair::

    base_model.randlora_A     A [r, 1, max d_min]        (shared)
    base_model.randlora_B     B [max d_max, max n, r]    (shared)
    M.randlora_A, M.randlora_B                           (copies of the shared pair)
    M.randlora_lambda         λ [r, n]     M.randlora_gamma   γ [n, d_min]

Module M uses A[:, 0, :d_min] and B[:d_max, :n, :]; its update is ``methods.randlora``'s
``(randlora_alpha / r)·Σᵢ Bᵢ Λᵢ A Γᵢ``. Our ``RandLoRAAdapter`` regenerates per-projection
bases from a key, so a PEFT adapter is held as :class:`PeftRandLoRAAdapter`: the same adapter
with the sliced bases stored (fixed ``AdapterBuffer``s, not trained, not counted) and the
shared pair kept for ``to_peft``. ``to_peft`` writes only such adapters (one shared pair);
``lowrank.save`` does not store bases, so save such a model with ``to_peft``.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.lowrank import _peft as P
from jaxattn.lowrank._apply import AdapterConfig, apply
from jaxattn.lowrank._io import _esc
from jaxattn.lowrank._surgery import linear_paths
from jaxattn.lowrank.methods.lora_bank import AdapterBuffer
from jaxattn.lowrank.methods.randlora import RandLoRAAdapter

SHARED = "base_model."
RANDLORA_DEFAULTS = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "modules_to_save": None,
    "peft_type": "RANDLORA",
    "peft_version": P.PEFT_VERSION,
    "projection_prng_key": 0,
    "r": 32,
    "randlora_alpha": 640,
    "randlora_dropout": 0.0,
    "revision": None,
    "save_projection": True,
    "sparse": False,
    "target_modules": None,
    "task_type": None,
    "very_sparse": False,
}
_HANDLED = {"r", "randlora_alpha", "target_modules"}
# the bases are read from the file, so how they were drawn does not matter
_INFO = P._INFO | {"init_weights", "projection_prng_key", "sparse", "very_sparse"}


class PeftRandLoRAAdapter(RandLoRAAdapter):
    """``RandLoRAAdapter`` whose bases are PEFT's (sliced from its shared pair), stored."""

    def __init__(self, linear, path, rank, scale, shared_a, shared_b):
        super().__init__(linear, path, rank, scale, seed=0)
        self.shared_a = AdapterBuffer(jnp.asarray(shared_a, jnp.float32))  # [r, 1, max d_min]
        self.shared_b = AdapterBuffer(jnp.asarray(shared_b, jnp.float32))  # [max d_max, n, r]

    def bases(self):
        """A [r, d_min] = shared_A[:, 0, :d_min], B [d_max, n, r] = shared_B[:d_max, :n]."""
        a = self.shared_a[...][:, 0, : self.d_min]
        return a, self.shared_b[...][: self.d_max, : self.num_bases, :]


def _split(rest: str) -> tuple[str, str]:
    """``M.randlora_lambda`` -> (``M``, ``randlora_lambda``)."""
    mod, _, leaf = rest.rpartition(".")
    return mod, leaf


def from_peft_randlora(model, directory: str, meta: dict, *, name: str) -> list[str]:
    file = os.path.join(directory, P.CONFIG)
    P._check_fields(meta, file, RANDLORA_DEFAULTS, _HANDLED, _INFO)
    if meta.get("target_modules") is None:
        raise ValueError(f"{file}: target_modules is missing")
    tensors = P._st().load_file(os.path.join(directory, P.TENSORS))
    modules, refused = P._module_map(model)
    r, alpha = int(meta.get("r", 32)), float(meta.get("randlora_alpha", 640))
    shared = {k: tensors.get(SHARED + "randlora_" + k) for k in ("A", "B")}
    bad = [f"{SHARED}randlora_{k}: missing" for k, v in shared.items() if v is None]
    names = ("randlora_A", "randlora_B", "randlora_lambda", "randlora_gamma")
    skip = (SHARED + "randlora_A", SHARED + "randlora_B")
    per, grouped = P._group(
        tensors, modules, refused, meta["target_modules"], names, _split, skip=skip
    )
    bad += grouped
    for mod, t in per.items():
        lin = modules[mod][1]
        d_min = min(lin.fan_in, lin.fan_out)
        n = -(-d_min // r)
        want = {"randlora_lambda": (r, n), "randlora_gamma": (n, d_min)}
        for leaf in names:
            if leaf not in t:
                bad.append(f"{P.PREFIX}{mod}.{leaf}: missing")
            elif leaf in want and t[leaf].shape != want[leaf]:
                bad.append(f"{P.PREFIX}{mod}.{leaf}: saved {t[leaf].shape}, expected {want[leaf]}")
        a, b = shared["A"], shared["B"]
        if (
            a is not None
            and b is not None
            and (
                a.ndim != 3
                or b.ndim != 3
                or a.shape[0] != r
                or b.shape[2] != r
                or a.shape[2] < d_min
                or b.shape[0] < max(lin.fan_in, lin.fan_out)
                or b.shape[1] < n
            )
        ):
            bad.append(
                f"{SHARED}randlora_A/B {a.shape}/{b.shape} do not cover {mod} (r={r}, n={n})"
            )
    if bad:
        raise ValueError(f"from_peft {directory}: the adapter does not fit:\n  " + "\n  ".join(bad))
    paths = {modules[m][0]: m for m in per}
    cfg = AdapterConfig(
        method="randlora",
        targets=[f"^{_esc(p)}$" for p in paths],
        options={"rank": r, "alpha": alpha},
        name=name,
    )
    done = apply(model, cfg, rngs=nnx.Rngs(0))
    found = linear_paths(model)
    for path in done:
        lin, t = found[path], per[paths[path]]
        ad = PeftRandLoRAAdapter(lin, path, r, alpha / r, shared["A"], shared["B"])
        ad.lam[...] = jnp.asarray(t["randlora_lambda"], jnp.float32)
        ad.gamma[...] = jnp.asarray(t["randlora_gamma"], jnp.float32)
        lin.adapter.adapters[name] = ad
    return done


def to_peft_randlora(held: dict, of_path: dict, directory: str, *, name: str) -> list[str]:
    ads = {p: lin.adapter.adapters[name] for p, lin in held.items()}
    first = next(iter(ads.values()))
    sa, sb = np.asarray(first.shared_a[...]), np.asarray(first.shared_b[...])
    bad = [
        f"{p}: no Hugging Face module is exactly this projection" for p in ads if p not in of_path
    ]
    for p, ad in ads.items():
        same = np.array_equal(np.asarray(ad.shared_a[...]), sa)
        if not same or not np.array_equal(np.asarray(ad.shared_b[...]), sb):
            bad.append(f"{p}: its RandLoRA bases are not the shared pair of the others")
        if ad.rank != first.rank or ad.scale != first.scale:
            bad.append(f"{p}: rank/scale differ (PEFT has one r and randlora_alpha)")
    if bad:
        raise ValueError("to_peft: cannot write:\n  " + "\n  ".join(bad))
    tensors = {SHARED + "randlora_A": sa, SHARED + "randlora_B": sb}
    for p, ad in ads.items():
        key = P.PREFIX + of_path[p]
        tensors[key + ".randlora_A"], tensors[key + ".randlora_B"] = sa, sb
        tensors[key + ".randlora_lambda"] = np.asarray(ad.lam[...])
        tensors[key + ".randlora_gamma"] = np.asarray(ad.gamma[...])
    meta = dict(RANDLORA_DEFAULTS)
    meta.update(
        r=first.rank,
        randlora_alpha=first.scale * first.rank,
        target_modules=sorted(of_path[p] for p in ads),
    )
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    P._st().save_file(tensors, os.path.join(directory, P.TENSORS), metadata={"format": "pt"})
    with open(os.path.join(directory, P.CONFIG), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return [of_path[p] for p in ads]
