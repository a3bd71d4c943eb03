"""LoRAPrune: structured pruning of heads / channels by a LoRA-guided importance, no ∇W.

Zhang, Chen, Sun, Zhao, Luo, Wang, Liu, Zhuang, "LoRAPrune: Structured Pruning Meets
Low-Rank Parameter-Efficient Fine-Tuning" (ACL Findings 2024, arXiv:2305.18403; official code
github.com/aim-uofa/LoRAPrune). A LoRA adapter a [*in, r] (LoRA init), b [r, *out] (zero),
s = alpha / r, on every target; on the projections ``prune`` selects it also carries a mask m
over the leading output axis (G groups: the kv heads of ``attn/v`` [H_kv, Dh], the channels of
``mlp/up`` [F]) that multiplies the projection's whole output, as the official code's
``result *= lora_mask``:

    y = m ⊙ (x·W + s·(x·a)·b)       Δy = (m − 1) ⊙ (x·W) + m ⊙ s·(x·a)·b

so a pruned v head makes that head's attention output exactly 0 (its q/k heads and o's input
columns are dead) and a pruned up channel makes down's input 0 (its gate channel and down's
row are dead): whole heads / channels go, and the merged kernel W' = m ⊙ (W + s·a·b) gives
the masked model's output exactly. :func:`slice_pruned` then removes them from the weights: a
physically smaller model (fewer kv/query heads, fewer MLP channels) with the same output.

LoRA-guided importance (Eq. 10-11 of the paper; ``compute_sensitivity`` of the official code),
in this [in, out] layout (PyTorch's B = bᵀ, A = aᵀ):

    Ĝ = a·∇b + ∇a·b − ∇a·∇b          (estimates ∂L/∂W from the LoRA factors' gradients)
    I_g = Σ_{i, j ∈ g} |Ĝ_ij · (W_ij + s·(a·b)_ij)|,  then I ← I / (‖I‖ + 1e-8)

a function of W, a, b, ∇a, ∇b only: ∂L/∂W is never formed. The step's I comes from the
gradient tap (``_taps.tapped``) as the cotangent of the ``sens`` leaf, on the gradients of the
loss the backward differentiates (``train.step``: token-summed, so the second-order term ∇a·∇b
weighs with the token count relative to the official mean-loss gradients; the per-module
normalisation removes every common factor of the first-order terms). :func:`loraprune_procedure`
(``train.finetune --adapter loraprune``) keeps the moving average S ← β·S + (1−β)·I in the
``sens`` leaf and every ``every`` steps prunes, per module, the ⌊G·ρ(t)⌋ groups of lowest S
(pruned groups first, so masks only shrink), with the official cubic schedule ρ(t) from
``init_ratio`` to ``ratio`` between the ``warmup`` and ``cooldown`` fractions of the run.

As the official code, a mask's importance is summed over its block: q, k, o (o grouped along
its input heads, q's heads summed onto their kv head under GQA) add to v's head score, gate
and down (down along its input channels) to up's channel score (``score_out``, ``score_in``),
each module's vector normalised first. Deviation: the official code prunes only while
ρ(t) < ratio, so it never reaches ``ratio``; here pruning also runs at ρ = ratio.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.layers import Linear
from jaxattn.lowrank._factors import RANK_AXIS, factor, kernel_axes
from jaxattn.lowrank._registry import MethodConfig, register_method
from jaxattn.lowrank.methods._seeds_common import (
    check_field,
    check_rank,
    contract,
    down_init,
    is_int,
    is_number,
    outer,
)
from jaxattn.lowrank.methods._taps import TAP_SCALE, modules_with, tapped

__all__ = ["LoRAPruneConfig", "LoRAPruneAdapter", "lora_guided_importance", "sparsity_schedule",
           "loraprune_procedure", "masks"]  # fmt: skip

PROCEDURE_FIELDS = ("ratio", "init_ratio", "warmup", "cooldown", "every", "beta")


@register_method("loraprune")
@dataclasses.dataclass(frozen=True)
class LoRAPruneConfig(MethodConfig):
    """LoRAPrune's hyper-parameters (the official ``prune.py`` names where it has them).

    Attributes:
      rank: LoRA rank r, 1 <= r <= min(fan_in, fan_out).
      alpha: scale numerator (s = alpha / r).
      prune: regex over projection paths that carry a pruning mask (default the v heads and
        the up channels).
      score_out, score_in: regexes of the other projections whose importance, grouped along
        their leading output (q, k, gate) or input (o, down) axis, adds to the masks of their
        block (the official code's per-layer sums); targets matching none get a plain LoRA.
      ratio: final fraction of groups pruned per masked module, in (0, 1).
      init_ratio: the schedule's start fraction, in [0, ratio).
      warmup, cooldown: fractions of the run before the schedule starts / after it reaches
        ``ratio`` (``warmup_iters``, ``cooldown_iters``), >= 0 with warmup + cooldown < 1.
      every: steps between pruning rounds (``prune_freq``), >= 1.
      beta: moving-average factor of the importance, in [0, 1) (official 0.9).
    """

    rank: int = 8
    alpha: float = 16.0
    prune: str = r"attn/v$|mlp/up$"
    score_out: str = r"attn/(q|k)$|mlp/gate$"
    score_in: str = r"attn/o$|mlp/down$"
    ratio: float = 0.5
    init_ratio: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.1
    every: int = 10
    beta: float = 0.9

    def training_rules(self) -> tuple[str, ...]:
        """AdamW on the adapter wrapped in the pruning procedure (``loraprune``)."""
        kw = ", ".join(f"{k}={getattr(self, k)!r}" for k in PROCEDURE_FIELDS)
        return (f"loraprune({kw}):/adapter/", "frozen:.*")

    def validate(self, path: str, linear: Linear) -> None:
        check_rank(path, linear, self.rank, min(linear.fan_in, linear.fan_out))
        for field in ("prune", "score_out", "score_in"):
            value = getattr(self, field)
            try:
                re.compile(value)
            except (re.error, TypeError) as err:
                msg = f"loraprune at {path!r}: {field}={value!r} is not a regex: {err}"
                raise ValueError(msg) from None
        _check_procedure(self, f"loraprune at {path!r}")

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> LoRAPruneAdapter:
        self.validate(path, linear)
        role = next(
            (r for r, pat in (("mask", self.prune), ("out", self.score_out),
                              ("in", self.score_in)) if re.search(pat, path)),
            None,
        )  # fmt: skip
        return LoRAPruneAdapter(linear, self.rank, self.alpha / self.rank, role, rngs=rngs)


def _check_procedure(cfg, where: str) -> None:
    def check(field, ok, want):
        check_field(where, cfg, field, ok, want)

    check("ratio", is_number(cfg.ratio) and 0.0 < cfg.ratio < 1.0, "in (0, 1)")
    ok = is_number(cfg.init_ratio) and 0.0 <= cfg.init_ratio < cfg.ratio
    check("init_ratio", ok, f"in [0, ratio={cfg.ratio})")
    for f in ("warmup", "cooldown"):
        v = getattr(cfg, f)
        check(f, is_number(v) and v >= 0, "a fraction of the run >= 0")
    check("cooldown", cfg.warmup + cfg.cooldown < 1.0, f"< 1 - warmup = {1.0 - cfg.warmup}")
    check("every", is_int(cfg.every) and cfg.every >= 1, "an int >= 1")
    check("beta", is_number(cfg.beta) and 0.0 <= cfg.beta < 1.0, "in [0, 1)")


ROLES = ("mask", "out", "in", None)


class LoRAPruneAdapter(nnx.Module):
    """The LoRAPrune adapter of one ``Linear``: ``a`` [*in, r], ``b`` [r, *out]; with role
    ``"mask"`` also ``mask`` [G] (0/1) and ``sens`` [G] (the importance average; the tap), with
    role ``"out"`` / ``"in"`` a ``sens`` tap [out_shape[0]] / [in_shape[0]] whose importance adds
    to its block's masks; all fp32 ``AdapterParam`` (see the module docstring)."""

    def __init__(self, linear: Linear, rank: int, scale: float, role, *, rngs):
        if role not in ROLES:
            raise ValueError(f"role={role!r} must be one of {ROLES}")
        in_ax, out_ax = kernel_axes(linear)
        self.n_in = len(linear.in_shape)
        self.scale = float(scale)
        self.role = role
        self.masked = role == "mask"
        self.a = factor(down_init(rngs.params(), linear.in_shape, rank), in_ax + (RANK_AXIS,))
        self.b = factor(jnp.zeros((rank,) + linear.out_shape), (RANK_AXIS,) + out_ax)
        if self.masked:
            self.mask = factor(jnp.ones((linear.out_shape[0],)), out_ax[:1])
        if role is not None:
            side, ax = (linear.in_shape, in_ax) if role == "in" else (linear.out_shape, out_ax)
            self.sens = factor(jnp.zeros((side[0],)), ax[:1])

    def _m(self, mask, like):
        return jax.lax.stop_gradient(mask).reshape(mask.shape + (1,) * (like.ndim - 1 - self.n_in))

    def _lora(self, x, a, b):
        return jnp.asarray(self.scale, x.dtype) * contract(contract(x, a, self.n_in), b, 1)

    def _delta(self, extra, x, a, b):
        base, mask = extra
        y = self._lora(x, a, b)
        if mask is None:
            return y
        m = self._m(mask, b).astype(x.dtype)
        return (m - 1) * contract(x, base, self.n_in) + m * y

    def _stat(self, extra, args, cts, dy):
        base, _ = extra
        _, a, b = args
        _, ga, gb = cts
        side = "in" if self.role == "in" else "out"
        return TAP_SCALE * lora_guided_importance(base, a, b, ga, gb, self.scale, side=side)

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` [..., *out] of ``x`` [..., *in] (see the module docstring)."""
        if self.role is None:
            return self._lora(x, self.a[...], self.b[...])
        extra = (base, self.mask[...] if self.masked else None)
        return tapped(self._delta, self._stat, self.sens[...], extra, x, self.a[...], self.b[...])

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` [*in, *out] with ``base + ΔK = m ⊙ (W + s·a·b)`` (fp32)."""
        lk = self.scale * outer(self.a[...], self.b[...])
        if not self.masked:
            return lk
        m = self._m(self.mask[...], self.b[...])
        return (m - 1) * base.astype(jnp.float32) + m * lk


def lora_guided_importance(w, a, b, ga, gb, scale, *, side: str = "out") -> jax.Array:
    """The per-group LoRA-guided importance (raw, before normalisation).

    Args:
      w: the frozen kernel [*in, *out]; a [*in, r], b [r, *out] the factors; ga, gb their
        gradients (same shapes); scale: s.
      side: ``"out"``: groups along the leading output axis ([out_shape[0]]); ``"in"``: along
        the leading input axis ([in_shape[0]]; the official code's transposed o / down).

    Returns:
      I_g = Σ_{(i, j) ∈ g} |Ĝ ⊙ (W + s·a·b)|_ij with Ĝ = a·∇b + ∇a·b − ∇a·∇b.
    """
    f32 = jnp.float32
    a, b, ga, gb = (t.astype(f32) for t in (a, b, ga, gb))
    g_hat = outer(a, gb) + outer(ga, b) - outer(ga, gb)
    s = jnp.abs(g_hat * (w.astype(f32) + scale * outer(a, b)))
    n_in = a.ndim - 1
    if side == "in":
        return jnp.sum(s, axis=tuple(range(1, s.ndim)))
    return jnp.sum(s, axis=tuple(range(n_in)) + tuple(range(n_in + 1, s.ndim)))


def sparsity_schedule(step, total, warmup, cooldown, init_ratio, ratio):
    """The official cubic schedule ρ(step): ``init_ratio`` up to step warmup·total, ``ratio``
    after total − cooldown·total, between them ratio + (init − ratio)·(1 − progress)³."""
    step = jnp.asarray(step, jnp.float32)
    w0, w1 = warmup * total, cooldown * total
    mul = 1.0 - (step - w0) / (total - w0 - w1)
    mid = ratio + (init_ratio - ratio) * mul**3
    return jnp.where(step <= w0, init_ratio, jnp.where(step > total - w1, ratio, mid))


def masks(model: nnx.Module) -> dict[str, jax.Array]:
    """``{adapter prefix path: mask [G]}`` of every masked LoRAPrune adapter of ``model``."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {
        p.rstrip("/"): leaves[ix["mask"]][1]
        for p, ix in modules_with(state, "sens").items()
        if "mask" in ix
    }


def slice_pruned(model: nnx.Module):
    """The physically smaller model of a merged LoRAPrune model: every pruned kv head (with
    its query heads) and MLP channel removed from the weights (``lowrank.loram.prune_model``
    with the plan the masks make), computing exactly what the masked model computes.

    ``model`` must hold its LoRAPrune adapters merged (``lowrank.merge``: the kernels are then
    ``m ⊙ (W + s·a·b)``); the result holds no adapter. A layer without masks keeps everything;
    the masks must keep the same count in every layer (the pruned model has one config).

    Raises:
      ValueError: no masked adapter, an unmerged one, or different kept counts per layer.
    """
    from jaxattn.lowrank._surgery import linear_paths
    from jaxattn.lowrank.loram import PruningPlan, prune_model

    found = masks(model)
    if not found:
        raise ValueError("slice_pruned: the model has no masked LoRAPrune adapter")
    lins = linear_paths(model)
    c = model.config
    kept = {"attn/v": [], "mlp/up": []}
    for i in range(c.num_layers):
        for proj, top in (("attn/v", c.num_kv_heads or c.num_heads), ("mlp/up", c.mlp_dim)):
            path = f"layers/{i}/{proj}"
            prefix = next((k for k in found if k.startswith(path + "/adapter/")), None)
            if prefix is not None and not lins[path].adapter.merged:
                raise ValueError(f"slice_pruned: {path!r} is not merged (lowrank.merge first)")
            mask = np.ones(top) if prefix is None else np.asarray(found[prefix])
            kept[proj].append(tuple(int(j) for j in np.flatnonzero(mask)))
    for proj, per_layer in kept.items():
        if len({len(k) for k in per_layer}) != 1:
            counts = [len(k) for k in per_layer]
            raise ValueError(f"slice_pruned: {proj} keeps {counts} per layer; one count needed")
    return prune_model(model, PruningPlan(tuple(kept["attn/v"]), tuple(kept["mlp/up"])))


def loraprune_procedure(
    inner: optax.GradientTransformation,
    *,
    total_steps: int,
    ratio: float = 0.5,
    init_ratio: float = 0.0,
    warmup: float = 0.1,
    cooldown: float = 0.1,
    every: int = 10,
    beta: float = 0.9,
) -> optax.GradientTransformation:
    """LoRAPrune's iterative structured pruning around ``inner`` (e.g. AdamW), one transform.

    Every LoRAPrune adapter with a ``sens`` tap (a prefix ``.../adapter/[adapters/NAME/]``) is
    a module; those with a ``mask`` are pruned, and a block is the adapters (of one name)
    under one parent path (``layers/0/attn/``, ``layers/0/mlp/``). Per step t (1-based): each
    module's ``sens`` gradient (the tap) normalised to unit norm; the importance of a mask of G
    groups is the sum over its block of those vectors, each summed down to G groups
    (consecutive runs: q's heads onto their kv head, as the official per-layer sums; a
    non-finite sum leaves S unchanged, as the official code); S ← β·S + (1−β)·I is written
    to the mask's ``sens`` (contributing taps stay 0); when t % every == 0 and
    ρ(t) > init_ratio, each module whose pruned fraction is below ``ratio`` keeps all but its
    ⌊G·ρ(t)⌋ groups of lowest S (pruned groups counted first), written to ``mask``. ``mask``
    and ``sens`` never take the inner updates; other leaves get them.

    Raises:
      ValueError: bad hyper-parameters (named); at init, no masked LoRAPrune adapter, or a
        block member whose group count is not a multiple of a mask's (both paths named).
    """
    cfg = dataclasses.make_dataclass("P", PROCEDURE_FIELDS)(
        ratio, init_ratio, warmup, cooldown, every, beta
    )
    _check_procedure(cfg, "loraprune_procedure")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"loraprune_procedure: total_steps={total_steps!r} must be an int >= 1")

    def modules(tree):
        taps = modules_with(tree, "sens")
        masked = {p: ix for p, ix in taps.items() if "mask" in ix}
        if not masked:
            raise ValueError("loraprune_procedure: no masked LoRAPrune adapter (mask, sens)")
        shapes = {p: jax.tree.leaves(tree)[ix["sens"]].shape[0] for p, ix in taps.items()}
        blocks = {p: [q for q in taps if _block(q) == _block(p)] for p in masked}
        for p, members in blocks.items():
            for q in members:
                if shapes[q] % shapes[p]:
                    raise ValueError(
                        f"loraprune_procedure: {q!r} has {shapes[q]} groups, not a multiple of "
                        f"the {shapes[p]} groups of the mask of {p!r} in the same block"
                    )
        return taps, masked, blocks

    def init(params):
        modules(params)
        return (inner.init(params), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("loraprune_procedure needs params in update(updates, state, params)")
        inner_state, count = state
        taps, mods, blocks = modules(params)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = jax.tree.leaves(params)
        u, inner_state = inner.update(updates, inner_state, params)
        out = list(jax.tree.leaves(u))
        t = count + 1
        rho = sparsity_schedule(t, total_steps, warmup, cooldown, init_ratio, ratio)
        rnd = (t % every == 0) & (rho > init_ratio)
        unit = {}
        for p, ix in taps.items():
            raw = g_leaves[ix["sens"]].astype(jnp.float32) / TAP_SCALE
            unit[p] = raw / (jnp.linalg.norm(raw) + 1e-8)
            if p not in mods:  # a contributing tap: its leaf stays 0
                out[ix["sens"]] = jnp.zeros_like(out[ix["sens"]])
        for p, ix in mods.items():
            mask, sens = p_leaves[ix["mask"]], p_leaves[ix["sens"]]
            groups = mask.shape[0]
            imp = sum(unit[q].reshape(groups, -1).sum(axis=1) for q in blocks[p])
            new_s = jnp.where(jnp.all(jnp.isfinite(imp)), beta * sens + (1 - beta) * imp, sens)
            need = jnp.floor(groups * rho).astype(jnp.int32)
            key = jnp.where(mask > 0, new_s, -1.0)  # pruned groups sort first
            order = jnp.argsort(key, stable=True)
            place = jnp.zeros((groups,), jnp.int32).at[order].set(jnp.arange(groups))
            pruned_frac = 1.0 - jnp.mean(mask)
            go = rnd & (pruned_frac < ratio)
            new_m = jnp.where(go, (place >= need).astype(mask.dtype), mask)
            out[ix["mask"]] = (new_m - mask).astype(out[ix["mask"]].dtype)
            out[ix["sens"]] = (new_s - sens).astype(out[ix["sens"]].dtype)
        return jax.tree.unflatten(treedef, out), (inner_state, t)

    return optax.GradientTransformation(init, update)


def _block(prefix: str) -> tuple[str, str]:
    """(parent path, adapter name) of an adapter prefix: ``layers/0/attn/v/adapter/adapters/
    default/`` -> (``layers/0/attn/``, ``default``); the adapters of one block share masks."""
    m = re.match(r"^(.*?)[^/]+/adapter/(?:adapters/([^/]+)/)?$", prefix)
    return (m.group(1), m.group(2) or "") if m else (prefix, "")
