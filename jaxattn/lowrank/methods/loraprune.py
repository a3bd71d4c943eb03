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
the masked model's output exactly.

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

Deviations: each mask's importance is its own module's (the official code sums q, k, v, o into
one per-layer head score and gate, up, down into one channel score); the official code prunes
only while ρ(t) < ratio, so it never reaches ``ratio``; here pruning also runs at ρ = ratio.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxattn.layers import Linear
from jaxattn.lowrank._factors import RANK_AXIS, factor, kernel_axes
from jaxattn.lowrank._registry import MethodConfig, register_method
from jaxattn.lowrank.methods._seeds_common import check_rank, contract, down_init, outer
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
        the up channels); other targets get a plain LoRA.
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
        try:
            re.compile(self.prune)
        except (re.error, TypeError) as err:
            msg = f"loraprune at {path!r}: prune={self.prune!r} is not a regex: {err}"
            raise ValueError(msg) from None
        _check_procedure(self, f"loraprune at {path!r}")

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> LoRAPruneAdapter:
        self.validate(path, linear)
        masked = re.search(self.prune, path) is not None
        return LoRAPruneAdapter(linear, self.rank, self.alpha / self.rank, masked, rngs=rngs)


def _check_procedure(cfg, where: str) -> None:
    def bad(field, want):
        raise ValueError(f"{where}: {field}={getattr(cfg, field)!r} must be {want}")

    num = (int, float)
    if not isinstance(cfg.ratio, num) or not 0.0 < cfg.ratio < 1.0:
        bad("ratio", "in (0, 1)")
    if not isinstance(cfg.init_ratio, num) or not 0.0 <= cfg.init_ratio < cfg.ratio:
        bad("init_ratio", f"in [0, ratio={cfg.ratio})")
    for f in ("warmup", "cooldown"):
        if not isinstance(getattr(cfg, f), num) or getattr(cfg, f) < 0:
            bad(f, "a fraction of the run >= 0")
    if cfg.warmup + cfg.cooldown >= 1.0:
        bad("cooldown", f"< 1 - warmup = {1.0 - cfg.warmup}")
    if not isinstance(cfg.every, int) or isinstance(cfg.every, bool) or cfg.every < 1:
        bad("every", "an int >= 1")
    if not isinstance(cfg.beta, num) or not 0.0 <= cfg.beta < 1.0:
        bad("beta", "in [0, 1)")


class LoRAPruneAdapter(nnx.Module):
    """The LoRAPrune adapter of one ``Linear``: ``a`` [*in, r], ``b`` [r, *out] and, when masked,
    ``mask`` [G] (0/1) and ``sens`` [G] (the importance average; the tap), all fp32
    ``AdapterParam`` (see the module docstring)."""

    def __init__(self, linear: Linear, rank: int, scale: float, masked: bool, *, rngs):
        in_ax, out_ax = kernel_axes(linear)
        self.n_in = len(linear.in_shape)
        self.scale = float(scale)
        self.masked = bool(masked)
        self.a = factor(down_init(rngs.params(), linear.in_shape, rank), in_ax + (RANK_AXIS,))
        self.b = factor(jnp.zeros((rank,) + linear.out_shape), (RANK_AXIS,) + out_ax)
        if self.masked:
            g = linear.out_shape[0]
            self.mask = factor(jnp.ones((g,)), out_ax[:1])
            self.sens = factor(jnp.zeros((g,)), out_ax[:1])

    def _m(self, mask, like):
        return jax.lax.stop_gradient(mask).reshape(mask.shape + (1,) * (like.ndim - 1 - self.n_in))

    def _lora(self, x, a, b):
        return jnp.asarray(self.scale, x.dtype) * contract(contract(x, a, self.n_in), b, 1)

    def _delta(self, extra, x, a, b):
        base, mask = extra
        y = self._lora(x, a, b)
        m = self._m(mask, b).astype(x.dtype)
        return (m - 1) * contract(x, base, self.n_in) + m * y

    def _stat(self, extra, args, cts, dy):
        base, _ = extra
        _, a, b = args
        _, ga, gb = cts
        return TAP_SCALE * lora_guided_importance(base, a, b, ga, gb, self.scale)

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` [..., *out] of ``x`` [..., *in] (see the module docstring)."""
        if not self.masked:
            return self._lora(x, self.a[...], self.b[...])
        extra = (base, self.mask[...])
        return tapped(self._delta, self._stat, self.sens[...], extra, x, self.a[...], self.b[...])

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` [*in, *out] with ``base + ΔK = m ⊙ (W + s·a·b)`` (fp32)."""
        lk = self.scale * outer(self.a[...], self.b[...])
        if not self.masked:
            return lk
        m = self._m(self.mask[...], self.b[...])
        return (m - 1) * base.astype(jnp.float32) + m * lk


def lora_guided_importance(w, a, b, ga, gb, scale) -> jax.Array:
    """The per-group LoRA-guided importance [G] (raw, before normalisation).

    Args:
      w: the frozen kernel [*in, *out]; a [*in, r], b [r, *out] the factors; ga, gb their
        gradients (same shapes); scale: s.

    Returns:
      I_g = Σ_{i, j∈g} |Ĝ ⊙ (W + s·a·b)| with Ĝ = a·∇b + ∇a·b − ∇a·∇b, g the leading out axis.
    """
    f32 = jnp.float32
    a, b, ga, gb = (t.astype(f32) for t in (a, b, ga, gb))
    g_hat = outer(a, gb) + outer(ga, b) - outer(ga, gb)
    s = jnp.abs(g_hat * (w.astype(f32) + scale * outer(a, b)))
    n_in = a.ndim - 1
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

    Every masked LoRAPrune adapter (a prefix ``.../adapter/[adapters/NAME/]`` holding ``mask``
    and ``sens``) is a module. Per step t (1-based): I = the ``sens`` gradient (the tap)
    normalised to unit norm (a non-finite I leaves S unchanged, as the official code);
    S ← β·S + (1−β)·I is written to ``sens``; when t % every == 0 and ρ(t) > init_ratio, each
    module whose pruned fraction is below ``ratio`` keeps all but its ⌊G·ρ(t)⌋ groups of
    lowest S (pruned groups counted first), written to ``mask``. ``mask`` and ``sens`` never
    take the inner updates; other leaves get them.

    Raises:
      ValueError: bad hyper-parameters (named); at init, no masked LoRAPrune adapter.
    """
    cfg = dataclasses.make_dataclass("P", PROCEDURE_FIELDS)(
        ratio, init_ratio, warmup, cooldown, every, beta
    )
    _check_procedure(cfg, "loraprune_procedure")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"loraprune_procedure: total_steps={total_steps!r} must be an int >= 1")

    def modules(tree):
        mods = {p: ix for p, ix in modules_with(tree, "sens").items() if "mask" in ix}
        if not mods:
            raise ValueError("loraprune_procedure: no masked LoRAPrune adapter (mask, sens)")
        return mods

    def init(params):
        modules(params)
        return (inner.init(params), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("loraprune_procedure needs params in update(updates, state, params)")
        inner_state, count = state
        mods = modules(params)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = jax.tree.leaves(params)
        u, inner_state = inner.update(updates, inner_state, params)
        out = list(jax.tree.leaves(u))
        t = count + 1
        rho = sparsity_schedule(t, total_steps, warmup, cooldown, init_ratio, ratio)
        rnd = (t % every == 0) & (rho > init_ratio)
        for ix in mods.values():
            mask, sens = p_leaves[ix["mask"]], p_leaves[ix["sens"]]
            raw = g_leaves[ix["sens"]].astype(jnp.float32) / TAP_SCALE
            imp = raw / (jnp.linalg.norm(raw) + 1e-8)
            new_s = jnp.where(jnp.all(jnp.isfinite(imp)), beta * sens + (1 - beta) * imp, sens)
            groups = mask.shape[0]
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
