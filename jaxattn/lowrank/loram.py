"""LoRAM: train LoRA on a structurally pruned copy, recover it for the original model.

Zhang, Zhang, Chen, Wang, Li, "Train Small, Infer Large: Memory-Efficient LoRA Training for
Large Language Models" (ICLR 2025, arXiv:2502.13533). Three steps, as functions:

  1. :func:`prune_model`: a smaller ``DecoderLM`` keeping, per layer, some GQA groups (kv head
     j with its G query heads j·G..j·G+G−1) and some MLP channels; every kernel axis whose
     logical name is ``kv_heads`` / ``heads`` / ``mlp`` is sliced to the kept indices (q, k, v
     outputs, o inputs; gate, up outputs, down inputs). :func:`l2_plan` ranks groups and
     channels by the L2 norm of their weights (a simple structured criterion standing in for
     the paper's LLM-Pruner / random variants; any :class:`PruningPlan` can be given).
  2. Train LoRA on the pruned model (``lowrank.apply`` + ``train.finetune`` as for any model;
     the paper's optional continual pre-training of the pruned model is the user's run).
  3. :func:`recover`: every pruned LoRA a_p [*in_p, r], b_p [r, *out_p] is scattered back to
     full shapes with zeros at the pruned indices,

         a[keep_in] = a_p, a[pruned] = 0;   b[:, keep_out] = b_p, b[:, pruned] = 0,

     so ΔW = s·a·b equals the small model's s·a_p·b_p on the kept coordinates and is 0 on the
     pruned ones, and the recovered LoRA is attached to the original (unpruned) model.

:func:`zero_pruned` zeroes the pruned structures of a full model in place; the full model so
masked, with the recovered adapters, computes what the pruned model with its adapters does (the
pruning mask is the same at training and inference). QLoRAM's 4-bit base is not done here.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.lowrank._apply import AdapterConfig, apply
from jaxattn.lowrank._surgery import linear_paths
from jaxattn.lowrank.methods.lora import LoRAAdapter, LoRAConfig

__all__ = ["PruningPlan", "l2_plan", "prune_model", "recover", "zero_pruned"]


def _check_mha(config) -> None:
    if config.attention != "mha" or config.layer_specs is not None:
        raise ValueError(f"LoRAM pruning needs attention='mha' layers, got {config.attention!r}")


@dataclasses.dataclass(frozen=True)
class PruningPlan:
    """Kept indices per layer: ``kv_heads[l]`` (GQA groups) and ``mlp[l]`` (channels), each a
    sorted tuple; every layer keeps the same counts (one config for the pruned model)."""

    kv_heads: tuple[tuple[int, ...], ...]
    mlp: tuple[tuple[int, ...], ...]

    def check(self, config) -> None:
        """``ValueError`` naming the field unless the plan fits ``config`` (a GQA ``mha``)."""
        _check_mha(config)
        for name, top in (
            ("kv_heads", config.num_kv_heads or config.num_heads),
            ("mlp", config.mlp_dim),
        ):
            keep = getattr(self, name)
            if len(keep) != config.num_layers:
                raise ValueError(f"{name} must list {config.num_layers} layers, got {len(keep)}")
            if len({len(k) for k in keep}) != 1 or not keep[0]:
                raise ValueError(f"{name} must keep the same nonzero count in every layer")
            for k in keep:
                if list(k) != sorted(set(k)) or k[0] < 0 or k[-1] >= top:
                    raise ValueError(f"{name} indices {k} must be sorted, distinct, in [0, {top})")

    def kept(self, config, layer: int) -> dict[str, np.ndarray]:
        """The kept indices of layer ``layer`` by logical axis name."""
        kv = config.num_kv_heads or config.num_heads
        g = config.num_heads // kv
        groups = np.asarray(self.kv_heads[layer])
        heads = (groups[:, None] * g + np.arange(g)[None, :]).ravel()
        return {"kv_heads": groups, "heads": heads, "mlp": np.asarray(self.mlp[layer])}


def l2_plan(model, *, kv_keep: int, mlp_keep: int) -> PruningPlan:
    """Keep, per layer, the ``kv_keep`` GQA groups and ``mlp_keep`` MLP channels of largest
    squared L2 norm (q, k, v, o weights of the group; gate, up, down weights of the channel)."""
    c = model.config
    _check_mha(c)
    for name, value, top in (
        ("kv_keep", kv_keep, c.num_kv_heads or c.num_heads),
        ("mlp_keep", mlp_keep, c.mlp_dim),
    ):
        if not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"{name}={value!r} must be an int in [1, {top}]")
    lins = linear_paths(model)
    kv, mlp = [], []
    for i in range(c.num_layers):
        p = f"layers/{i}/"
        g = c.num_heads // (c.num_kv_heads or c.num_heads)
        sq = lambda n, axes: jnp.sum(jnp.square(lins[p + n].base_kernel(jnp.float32)), axes)  # noqa: E731
        heads = sq("attn/q", (0, 2)) + sq("attn/o", (1, 2))
        group = heads.reshape(-1, g).sum(1) + sq("attn/k", (0, 2)) + sq("attn/v", (0, 2))
        chan = sq("mlp/gate", 0) + sq("mlp/up", 0) + sq("mlp/down", 1)
        kv.append(tuple(sorted(np.argsort(-np.asarray(group))[:kv_keep].tolist())))
        mlp.append(tuple(sorted(np.argsort(-np.asarray(chan))[:mlp_keep].tolist())))
    return PruningPlan(tuple(kv), tuple(mlp))


def _axes(var):
    return tuple(var.get_metadata().get("out_sharding") or ())


def _slice(value, axes, kept):
    value = np.asarray(value)  # host-side: one gather per kept axis, no device compiles
    for ax, name in enumerate(axes):
        if name in kept:
            value = np.take(value, kept[name], axis=ax)
    return value


def _layer(path) -> int | None:
    return int(path[1]) if len(path) > 1 and path[0] == "layers" else None


def prune_model(model, plan: PruningPlan):
    """A new, smaller model of ``type(model)``: the kept heads / channels of ``model``'s
    weights (``plan``), every other parameter copied. Adapters on ``model`` are not copied."""
    c = model.config
    plan.check(c)
    head_dim = c.head_dim or c.d_model // c.num_heads
    g = c.num_heads // (c.num_kv_heads or c.num_heads)
    n_kv, n_mlp = len(plan.kv_heads[0]), len(plan.mlp[0])
    small_cfg = dataclasses.replace(
        c, num_heads=n_kv * g, num_kv_heads=n_kv, head_dim=head_dim, mlp_dim=n_mlp
    )
    small = nnx.eval_shape(lambda: type(model)(small_cfg, rngs=nnx.Rngs(0)))  # no init run
    src = dict(nnx.to_flat_state(nnx.state(model)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(small)):
        if path not in src:
            raise ValueError(f"pruned model has parameter {path} the original lacks")
        layer = _layer(path)
        v = src[path][...]
        if layer is not None:
            v = _slice(v, _axes(src[path]), plan.kept(c, layer))
        if v.shape != var.shape:
            raise ValueError(f"pruned {path}: {v.shape} does not fit {var.shape}")
        out.append((path, var.replace(jnp.asarray(v, var.dtype))))
    nnx.update(small, nnx.from_flat_state(out))
    return small


def _scatter(value, axes, kept, full_shape):
    """Zeros of ``full_shape`` with ``value`` at the kept indices of every pruned axis."""
    idx = tuple(kept[n] if n in kept else np.arange(s) for n, s in zip(axes, full_shape))
    out = np.zeros(full_shape, np.asarray(value).dtype)
    out[np.ix_(*idx)] = np.asarray(value)
    return jnp.asarray(out)


def _lora_of(linear, name, path):
    """(LoRAAdapter, its LoRAConfig) of ``linear``'s adapter ``name`` (an ``AdapterSet``)."""
    ad_set = linear.adapter
    if not hasattr(ad_set, "adapters") or name not in ad_set.adapters:
        raise ValueError(f"recover: {path!r} has no lowrank.apply adapter named {name!r}")
    ad = ad_set.adapters[name]
    _, cfg = ad_set.record(name)
    if not isinstance(ad, LoRAAdapter) or ad.use_dora:
        raise ValueError(
            f"recover needs plain LoRA adapters (method 'lora', no DoRA) at {path!r}, "
            f"got {type(ad).__name__}"
        )
    return ad, cfg


def recover(small, full, plan: PruningPlan, *, name: str = "default") -> list[str]:
    """Apply to ``full`` (``lowrank.apply``, adapter ``name``, method ``lora``) the LoRA of
    every adapted projection of ``small`` (the model :func:`prune_model` made with ``plan``),
    its factors scattered to full shapes with zeros at the pruned indices (module docstring).
    The recovered adapters merge, save and load like any ``lora`` adapter.

    Returns:
      The adapted paths of ``full``.
    """
    plan.check(full.config)
    lins_full = linear_paths(full)
    groups: dict[str, list[str]] = {}  # method config json -> paths (one apply per config)
    factors = {}
    for path, lin in linear_paths(small).items():
        if lin.adapter is None:
            continue
        ad, cfg = _lora_of(lin, name, path)
        target = lins_full[path]
        layer = int(path.split("/")[1]) if path.startswith("layers/") else None
        kept = {} if layer is None else plan.kept(full.config, layer)
        k_axes = _axes(target.kernel)
        n_in = len(target.in_shape)
        r = ad.a.shape[-1]
        a = _scatter(ad.a[...], k_axes[:n_in] + (None,), kept, target.in_shape + (r,))
        b = _scatter(ad.b[...], (None,) + k_axes[n_in:], kept, (r,) + target.out_shape)
        factors[path] = (a, b)
        # the LoRA fields alone: a LoRA subclass (``loram``) recovers as plain ``lora``
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoRAConfig)}
        fields = LoRAConfig(**(fields | {"init": "zero"})).to_json()
        groups.setdefault(json.dumps(fields, sort_keys=True), []).append(path)
    if not factors:
        raise ValueError(f"recover: the pruned model has no adapters named {name!r}")
    done = []
    for fields_json, paths in groups.items():
        fields = json.loads(fields_json)
        fields.pop("method")
        pattern = "^(" + "|".join(paths) + ")$"
        done += apply(
            full, AdapterConfig("lora", fields, targets=pattern, name=name), rngs=nnx.Rngs(0)
        )
    for path in done:
        ad = lins_full[path].adapter.adapters[name]
        ad.a[...], ad.b[...] = factors[path]
    return done


def zero_pruned(model, plan: PruningPlan) -> None:
    """Zero, in place, every weight of ``model`` at a pruned head / channel index (the kernels
    of q, k, v, o, gate, up, down along their pruned logical axes)."""
    c = model.config
    plan.check(c)
    for path, lin in linear_paths(model).items():
        if not path.startswith("layers/"):
            continue
        kept = plan.kept(c, int(path.split("/")[1]))
        w = np.array(lin.kernel[...])
        for ax, n in enumerate(_axes(lin.kernel)):
            if n in kept:
                drop = np.setdiff1d(np.arange(w.shape[ax]), kept[n])
                w[(slice(None),) * ax + (drop,)] = 0
        lin.kernel[...] = jnp.asarray(w)
