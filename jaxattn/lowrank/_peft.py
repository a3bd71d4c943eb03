"""PEFT interchange: ``adapter_model.safetensors`` + ``adapter_config.json`` as peft 0.21.2.

``from_peft(model, dir)`` attaches the LoRA / DoRA / rsLoRA adapter a PEFT ``save_pretrained``
wrote for the Hugging Face twin of ``model`` (a ``DecoderLM`` from ``models.from_hf``: Llama,
Qwen2, Mistral, DeepSeek-V2/V3); ``to_peft(model, dir)`` writes one that
``peft.PeftModel.from_pretrained`` loads with no missing or unexpected keys.

Format (peft 0.21.2, ``peft_type: "LORA"``), one entry per adapted HF module ``M`` (e.g.
``model.layers.0.self_attn.q_proj``), keys prefixed ``base_model.model.``::

    M.lora_A.weight          A [r, fan_in]     = a.reshape(fan_in, r)ᵀ
    M.lora_B.weight          B [fan_out, r]    = b.reshape(r, fan_out)ᵀ
    M.lora_magnitude_vector  m [fan_out]       (DoRA only) = magnitude.reshape(fan_out)

with ``a`` [*in, r], ``b`` [r, *out] and ``magnitude`` [*out] our ``LoRAAdapter`` factors; the
update is ``ΔW = s·B·A`` with ``s = lora_alpha / r`` (``use_rslora``: ``lora_alpha / √r``),
per module ``r`` / ``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern`` (PEFT's
``get_pattern_key``: a key ``k`` matches module ``M`` when ``re.match(rf"(.*\\.)?({k})$", M)``).

An adapted ``lm_head`` / ``embed_tokens`` also gets its whole base weight saved as
``M.base_layer.weight`` (peft's ``save_embedding_layers="auto"``): ``to_peft`` writes it and
``from_peft`` accepts it only if it equals this model's base weight.

Which HF module is which projection comes from the model, ``model.hf_projections()``
(``models.DecoderLM`` derives it from the table ``from_hf`` reads checkpoints with, and
names only modules whose conversion is exactly ``Wᵀ.reshape(*in, *out)``), which makes the
factor reshapes above exact. DeepSeek's
``kv_b_proj`` (one HF module, our ``k_b`` + ``v_b``) has no one-to-one image: it is refused.

``bias="lora_only"`` (the trained bias of each adapted module saved as
``M.base_layer.bias``) is read as this library's per-adapter bias change (saved − base, so
``disabled`` still gives the base) and written from it; ``"all"`` is refused. Every other
``LoraConfig`` field must hold its peft default (no ``modules_to_save``, no
``layers_to_transform``, ...): a non-default one raises ``ValueError``
naming it, never dropped. ``init_lora_weights`` may be ``true``/``false``/``"gaussian"``
(it only chose the saved values); base-rewriting inits (PiSSA, OLoRA, ...) are refused.

``peft_type: "RANDLORA"`` (shared bases in the file, per-module ``randlora_lambda`` /
``randlora_gamma``) is read and written by ``_peft_randlora`` (its docstring has the keys).
Not supported (refused with a ValueError): other ``peft_type`` values (VeRA, ...), and
adapters on DeepSeek's ``kv_b_proj``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.lowrank._apply import AdapterConfig, apply, holding
from jaxattn.lowrank._io import _esc, _flat, _st
from jaxattn.lowrank._surgery import linear_paths
from jaxattn.lowrank.methods.lora import LoRAAdapter

__all__ = ["from_peft", "to_peft"]

TENSORS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
BASE_SUFFIX = ".base_layer.weight"  # a full base weight PEFT saves beside an adapted head
BIAS_SUFFIX = ".base_layer.bias"  # bias="lora_only": the trained bias of an adapted module
BIAS_MODES = ("none", "lora_only")  # peft's "all" trains biases outside the targets
EMBEDDING_LAYERS = ("embed_tokens", "lm_head")  # peft's EMBEDDING_LAYER_NAMES

# LoraConfig fields peft 0.21.2 writes, at their defaults. Those in _HANDLED are read; the rest
# must equal these defaults (anything else is a feature this library does not implement).
LORA_DEFAULTS = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
_HANDLED = {"r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "rank_pattern"}
_HANDLED |= {"alpha_pattern", "target_modules", "init_lora_weights", "bias"}
# informational: any value is fine (they do not change what the adapter computes)
_INFO = {"auto_mapping", "base_model_name_or_path", "revision", "task_type", "peft_version"}
_INFO |= {"inference_mode", "megatron_core", "qalora_group_size"}
_INITS = (True, False, "gaussian")  # inits that leave the base weight as it is


def _module_map(model) -> tuple[dict, dict]:
    """(HF module name -> (our path, Linear), refused HF module name -> reason).

    The names come from the model itself: ``model.hf_projections()`` (``models.DecoderLM``
    derives them from the table ``from_hf`` reads checkpoints with); jaxattn knows no model
    family.
    """
    table = getattr(model, "hf_projections", None)
    if table is None:
        raise ValueError(
            "model must name its Hugging Face projections (hf_projections(), as "
            f"models.DecoderLM does), got {type(model).__name__}"
        )
    paths, refused = table()
    found = linear_paths(model)
    missing = sorted(p for p in paths.values() if p not in found)
    if missing:
        raise ValueError(f"model.hf_projections() names paths that are not Linears: {missing}")
    return {m: (p, found[p]) for m, p in paths.items()}, dict(refused)


def _pattern_key(patterns: dict, module: str):
    """PEFT ``get_pattern_key``: the first key matching ``module``, else None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _targeted(target, module: str) -> bool:
    """PEFT ``check_target_module_exists`` for a list or a full-match regex string."""
    if isinstance(target, str):
        if target == "all-linear":
            return not module.endswith("lm_head")
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def _check_base_copy(key, mod, saved, modules) -> list[str]:
    """PEFT saves the whole base weight of an adapted ``lm_head`` / ``embed_tokens``
    (``save_embedding_layers``); accept it only if it is our base weight."""
    if mod.rsplit(".", 1)[-1] not in EMBEDDING_LAYERS or mod not in modules:
        return [f"{key}: unexpected tensor"]
    lin = modules[mod][1]
    ours = np.asarray(lin.base_kernel(jnp.float32)).reshape(lin.fan_in, lin.fan_out).T
    tol = 4 * float(jnp.finfo(lin.kernel[...].dtype).eps)
    if saved.shape != ours.shape or not np.allclose(saved, ours, rtol=tol, atol=tol):
        return [f"{key}: the saved base weight differs from this model's (a different base)"]
    return []


def _split(rest: str) -> tuple[str, str]:
    """``M.lora_A.weight`` -> (``M``, ``lora_A.weight``)."""
    mod, _, suffix = rest.partition(".lora_")
    return mod, "lora_" + suffix


def _group(tensors: dict, modules: dict, refused: dict, target, leaves, split, skip=()):
    """The saved per-module tensors as ``{HF module: {leaf: array}}``, and every problem.

    Each key must be ``PREFIX + M + "." + leaf`` for a projection ``M`` of this model and a
    ``leaf`` in ``leaves`` (``split`` cuts the name after the prefix into the two), or an
    adapted embedding layer's base copy (checked against ours); ``skip`` names tensors the
    caller reads itself (RandLoRA's shared bases). Every module ``target`` selects must be
    saved. Problems are returned, one line each, never raised one at a time.
    """
    by_module, bad = {}, []
    for key in sorted(tensors):
        if key in skip:
            continue
        rest = key.removeprefix(PREFIX)
        if key.startswith(PREFIX) and rest.endswith(BASE_SUFFIX):
            bad += _check_base_copy(key, rest[: -len(BASE_SUFFIX)], tensors[key], modules)
            continue
        if key.startswith(PREFIX) and rest.endswith(BIAS_SUFFIX) and "bias" in leaves:
            mod, leaf = rest[: -len(BIAS_SUFFIX)], "bias"
        else:
            mod, leaf = split(rest)
        if not key.startswith(PREFIX) or leaf not in leaves:
            bad.append(f"{key}: unexpected tensor")
        elif mod in refused:
            bad.append(f"{key}: module {mod} cannot be adapted here: {refused[mod]}")
        elif mod not in modules:
            bad.append(f"{key}: {mod} is not a projection of this model")
        else:
            by_module.setdefault(mod, {})[leaf] = tensors[key]
    for mod in modules:
        if _targeted(target, mod) and mod not in by_module:
            bad.append(f"{PREFIX}{mod}: targeted by target_modules={target!r} but not saved")
    return by_module, bad


def _check_fields(meta: dict, file: str, defaults=None, handled=None, info=None) -> None:
    defaults = LORA_DEFAULTS if defaults is None else defaults
    handled = _HANDLED if handled is None else handled
    info = _INFO if info is None else info
    unknown = sorted(set(meta) - set(defaults))
    if unknown:
        kind = meta.get("peft_type")
        raise ValueError(f"{file}: {kind} config field(s) {unknown} are not known to peft 0.21.2")
    for field, default in defaults.items():
        if field in handled or field in info or field not in meta:
            continue
        empty = ({}, None, [])  # peft writes an unset field as any of these
        if meta[field] != default and not (default in empty and meta[field] in empty):
            raise ValueError(
                f"{file}: {field}={meta[field]!r} is not supported by jaxattn.lowrank.from_peft "
                f"(only the default {default!r})"
            )
    if meta.get("peft_type") == "LORA" and meta.get("init_lora_weights", True) not in _INITS:
        raise ValueError(
            f"{file}: init_lora_weights={meta['init_lora_weights']!r} rewrites the base weight; "
            f"from_peft reads adapters whose init is one of {list(_INITS)}"
        )
    if meta.get("peft_type") == "LORA" and meta.get("bias", "none") not in BIAS_MODES:
        raise ValueError(
            f"{file}: bias={meta['bias']!r} is not supported by jaxattn.lowrank.from_peft "
            f"(one of {list(BIAS_MODES)}; 'all' trains biases of modules it does not adapt)"
        )
    if meta.get("target_modules") is None:
        raise ValueError(f"{file}: target_modules is missing")


def from_peft(model: nnx.Module, directory: str, *, name: str = "default") -> list[str]:
    """Attach the PEFT LoRA adapter saved in ``directory`` to ``model`` as adapter ``name``.

    Args:
      model: a ``DecoderLM`` from ``models.from_hf`` of the HF model the adapter was made for.
      directory: holds ``adapter_model.safetensors`` and ``adapter_config.json`` (peft 0.21.2).
      name: the adapter name here (the PEFT adapter name is not part of its files).

    Returns:
      Our adapted projection paths (``layers/0/attn/q``, ...), in model order.

    Raises:
      ValueError: a config field this library does not implement (named), a module with no
        one-to-one projection here (e.g. DeepSeek's ``kv_b_proj``), or tensors that are
        missing, unexpected or of the wrong shape (every one listed).
    """
    file = os.path.join(directory, CONFIG)
    with open(file) as f:
        meta = json.load(f)
    if meta.get("peft_type") == "RANDLORA":
        from jaxattn.lowrank._peft_randlora import from_peft_randlora

        return from_peft_randlora(model, directory, meta, name=name)
    if meta.get("peft_type") != "LORA":
        raise ValueError(
            f"{file}: peft_type={meta.get('peft_type')!r}; from_peft reads 'LORA' and 'RANDLORA'"
        )
    _check_fields(meta, file)
    tensors = _st().load_file(os.path.join(directory, TENSORS))
    modules, refused = _module_map(model)
    dora = bool(meta.get("use_dora", False))
    bias = meta.get("bias", "none") == "lora_only"
    suffixes = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
    leaves = suffixes + (("bias",) if bias else ())
    by_module, bad = _group(tensors, modules, refused, meta["target_modules"], leaves, _split)
    r0, alpha0 = int(meta.get("r", 8)), meta.get("lora_alpha", 8)
    rank_pat, alpha_pat = meta.get("rank_pattern") or {}, meta.get("alpha_pattern") or {}
    overrides, values = {}, {}
    for mod, t in by_module.items():
        path, lin = modules[mod]
        missing = [s for s in suffixes if s not in t]
        if missing:
            bad += [f"{PREFIX}{mod}.{s}: missing" for s in missing]
            continue
        k = _pattern_key(rank_pat, mod)
        r = int(rank_pat[k]) if k is not None else r0
        k = _pattern_key(alpha_pat, mod)
        alpha = float(alpha_pat[k]) if k is not None else float(alpha0)
        want = {"lora_A.weight": (r, lin.fan_in), "lora_B.weight": (lin.fan_out, r)}
        want["lora_magnitude_vector"] = (lin.fan_out,)
        wrong = [s for s in suffixes if tuple(t[s].shape) != want[s]]
        bad += [f"{PREFIX}{mod}.{s}: saved {tuple(t[s].shape)}, expected {want[s]}" for s in wrong]
        if wrong:
            continue
        overrides[f"^{_esc(path)}$"] = {
            "rank": r,
            "alpha": alpha,
            "use_rslora": bool(meta.get("use_rslora", False)),
            "dropout": float(meta.get("lora_dropout", 0.0)),
            "use_dora": dora,
            "init": "zero",
        }
        values[path] = {
            "a": t["lora_A.weight"].T.reshape(lin.in_shape + (r,)),
            "b": t["lora_B.weight"].T.reshape((r,) + lin.out_shape),
        }
        if dora:
            values[path]["magnitude"] = t["lora_magnitude_vector"].reshape(lin.out_shape)
        if bias and (lin.bias is None) != ("bias" not in t):
            what = "a bias this projection lacks" if lin.bias is None else "no trained bias"
            bad.append(f"{PREFIX}{mod}{BIAS_SUFFIX}: bias='lora_only' but the file holds {what}")
        elif bias and lin.bias is not None:
            trained = np.asarray(t["bias"], np.float32)
            if trained.shape != (lin.fan_out,):
                bad.append(f"{PREFIX}{mod}{BIAS_SUFFIX}: saved {trained.shape}, expected "
                           f"{(lin.fan_out,)}")  # fmt: skip
                continue
            base_b = np.asarray(lin.bias[...], np.float32).reshape(-1)
            values[path]["bias"] = (trained - base_b).reshape(lin.out_shape)
    if bad:
        raise ValueError(f"from_peft {directory}: the adapter does not fit:\n  " + "\n  ".join(bad))
    if not values:
        raise ValueError(f"from_peft {directory}: {TENSORS} holds no LoRA tensor")
    cfg = AdapterConfig(
        method="lora",
        targets=list(overrides),
        overrides=overrides,
        name=name,
        bias="lora_only" if bias else "none",
    )
    done = apply(model, cfg, rngs=nnx.Rngs(0))
    found = linear_paths(model)
    for path in done:
        slot = found[path].adapter
        for key, var in _flat(slot.adapters[name]).items():
            var[...] = jnp.asarray(values[path][key], var.dtype)
        if name in slot.bias_deltas:  # the trained bias, as the change from ours
            var = slot.bias_deltas[name]
            var[...] = jnp.asarray(values[path]["bias"], var.dtype)
    return done


def _uniform(field: str, per_path: dict):
    vals = set(per_path.values())
    if len(vals) > 1:
        raise ValueError(f"to_peft: PEFT has one {field} per adapter; here it varies: {per_path}")
    return vals.pop()


def _bias_mode(held: dict, trained: set) -> str:
    """peft's ``bias`` of an adapter: ``"lora_only"`` when every adapted projection with a
    bias trains it, ``"none"`` when none does; a mixture has no peft form (refused)."""
    with_bias = {p for p, lin in held.items() if lin.bias is not None}
    if trained and trained != with_bias:
        raise ValueError(
            f"to_peft: peft's bias='lora_only' trains the bias of every adapted module; here only "
            f"{sorted(trained)} of {sorted(with_bias)} train it"
        )
    return "lora_only" if trained else "none"


def _common(per_module: dict):
    """(the most common value, {escaped module: value} for the others) -> r / rank_pattern."""
    top = Counter(per_module.values()).most_common(1)[0][0]
    return top, {re.escape(m): v for m, v in per_module.items() if v != top}


def to_peft(model: nnx.Module, directory: str, *, name: str = "default") -> list[str]:
    """Write LoRA adapter ``name`` of ``model`` as a peft 0.21.2 adapter directory.

    ``target_modules`` lists the full HF module names; ranks and alphas that differ from the
    most common one go to ``rank_pattern`` / ``alpha_pattern`` (keys: escaped module names).

    Returns:
      The HF module names written, in model order.

    Raises:
      ValueError: no LoRA adapter ``name`` (or it is merged), a projection with no one-to-one
        HF module (named), a base-rewriting init (PiSSA / OLoRA: PEFT would apply it to the
        original base), or a per-path ``use_rslora`` / ``use_dora`` / ``dropout`` (PEFT has one).
    """
    modules, _ = _module_map(model)
    of_path = {p: m for m, (p, _) in modules.items()}
    held = holding(model, name, op="to_peft")
    trained_bias = {p for p, lin in held.items() if name in lin.adapter.bias_deltas}
    from jaxattn.lowrank._peft_randlora import PeftRandLoRAAdapter, to_peft_randlora

    if all(isinstance(lin.adapter.adapters[name], PeftRandLoRAAdapter) for lin in held.values()):
        if trained_bias:  # peft's RandLoRA has its own bias mode: never drop it silently
            raise ValueError(
                f"to_peft: RandLoRA adapter {name!r} trains biases at {sorted(trained_bias)}; "
                "writing them in peft's RandLoRA format is not supported"
            )
        return to_peft_randlora(held, of_path, directory, name=name)
    tensors, fields, bad = {}, {}, []
    for path, lin in held.items():
        ad = lin.adapter.adapters[name]
        if not isinstance(ad, LoRAAdapter):
            bad.append(
                f"{path}: a {type(ad).__name__}; to_peft writes LoRA / DoRA adapters and "
                "RandLoRA adapters read by from_peft (bases shared by every module)"
            )
            continue
        if path not in of_path:
            bad.append(f"{path}: no Hugging Face module is exactly this projection")
            continue
        _, method = lin.adapter.record(name)
        if method.init in ("pissa", "olora"):
            bad.append(f"{path}: init={method.init!r} rewrote the base kernel")
        mod = of_path[path]
        fields[mod] = method
        r = method.rank
        key = PREFIX + mod
        tensors[key + ".lora_A.weight"] = np.asarray(ad.a[...]).reshape(lin.fan_in, r).T
        tensors[key + ".lora_B.weight"] = np.asarray(ad.b[...]).reshape(r, lin.fan_out).T
        if ad.use_dora:
            tensors[key + ".lora_magnitude_vector"] = np.asarray(ad.magnitude[...]).reshape(-1)
        if path in trained_bias:  # bias="lora_only": peft saves the trained bias itself
            b = np.asarray(lin.bias[...], np.float32) + np.asarray(
                lin.adapter.bias_deltas[name][...], np.float32
            )
            tensors[key + BIAS_SUFFIX] = b.reshape(-1)
        if mod in EMBEDDING_LAYERS:  # peft's save_embedding_layers="auto" writes its base too
            w = np.asarray(lin.base_kernel(jnp.float32)).reshape(lin.fan_in, lin.fan_out).T
            tensors[key + BASE_SUFFIX] = w
    if bad:
        raise ValueError("to_peft: cannot write:\n  " + "\n  ".join(bad))
    r, rank_pattern = _common({m: f.rank for m, f in fields.items()})
    alpha, alpha_pattern = _common({m: f.alpha for m, f in fields.items()})
    meta = dict(LORA_DEFAULTS)
    meta.update(
        r=r,
        lora_alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=_uniform("use_rslora", {m: f.use_rslora for m, f in fields.items()}),
        use_dora=_uniform("use_dora", {m: f.use_dora for m, f in fields.items()}),
        lora_dropout=_uniform("lora_dropout", {m: f.dropout for m, f in fields.items()}),
        bias=_bias_mode(held, trained_bias),
        target_modules=sorted(fields),
        auto_mapping=None,
    )
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    _st().save_file(tensors, os.path.join(directory, TENSORS), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return list(fields)
