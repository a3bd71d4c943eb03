"""IncreLoRA: LoRA whose rank grows during training where the importance score is highest.

Zhang, Li, Zhang, Yang, Liu, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning" (arXiv:2308.12043; official code
github.com/FeiyuZhang98/IncreLoRA). Each adapted ``Linear`` W [*in, *out] has an SVD-form
update padded to a maximum rank R, of which the first n components are active:

    ΔK = s · a·diag(e ⊙ m)·b        Δy = s · ((x·a) ⊙ (e ⊙ m))·b         (s = alpha / rank)

a [*in, R], b [R, *out] ~ N(0, 0.02²), e [R] = 0 (so the adapter starts as an exact no-op),
m [R] the active mask (``active`` leaf, 1 for the first ``rank`` components). Inactive
components are masked with ``where``: they contribute exactly 0 and get exactly 0 gradient.
Shapes never change, so growth needs no recompilation.

Importance (the official code's backward hook): the module score of a step is

    S = Σ_ij |ΔK_ij · ∂L/∂ΔK_ij| / sqrt(#ΔK),      ∂L/∂ΔK = Σ_tokens xᵀ·dy

delivered by the gradient tap (``_taps.tapped``) as the cotangent of the ``ipt`` leaf, and
smoothed as in AdaLoRA: Ī ← β₁Ī + (1−β₁)S, Ū ← β₂Ū + (1−β₂)|S − Ī|, score = Ī·Ū.
Every ``interval`` steps after ``warmup``, while the total active rank is below the budget
(``target_rank`` x the number of modules), the ``top_h`` modules of highest score (among those
with room) each activate the next ``add_rank`` components: :func:`increlora_procedure`, the
optax transform ``train.finetune --adapter increlora`` runs. A new component has e = 0
(the official code without "advance learning"), so growth does not change the function; its a
and b keep their N(0, 0.02²) init and were never updated while inactive (the procedure masks
the inner optimizer's updates, weight decay included, to the active components).

Cost: the score needs ∂L/∂ΔK, one dense [fan_in, fan_out] contraction per adapted module per
step (as the official backward hook), also after the budget is reached (the official code
removes its hook then; a jitted step keeps one program).

Deviations from the official code: s = alpha / rank is fixed (the official alpha / ranknum
changes with the rank, so growth would change the function); "advance learning" (reserve
components trained before activation) and the orthogonality regulariser are not implemented;
ties in the score select exactly ``top_h`` modules (the official ``>=`` threshold may take more),
and the budget is never exceeded.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxattn.layers import Linear
from jaxattn.lowrank._factors import RANK_AXIS, factor, kernel_axes
from jaxattn.lowrank._registry import MethodConfig, register_method
from jaxattn.lowrank.methods._seeds_common import (
    check_field,
    check_rank,
    contract,
    is_int,
    is_number,
    outer,
)
from jaxattn.lowrank.methods._taps import TAP_SCALE, modules_with, tapped

__all__ = ["IncreLoRAConfig", "IncreLoRAAdapter", "increlora_procedure", "active_ranks",
           "module_score"]  # fmt: skip


@register_method("increlora")
@dataclasses.dataclass(frozen=True)
class IncreLoRAConfig(MethodConfig):
    """IncreLoRA's hyper-parameters (the official ``RankAllocator``'s names where it has them).

    Attributes:
      rank: initial active rank (``lora_r``), 1 <= rank <= max_rank.
      max_rank: R, the padded rank, rank <= R <= min(fan_in, fan_out).
      alpha: scale numerator (s = alpha / rank).
      target_rank: average final rank per module (budget = target_rank x #modules),
        rank <= target_rank <= max_rank.
      add_rank: components added to a selected module per growth (``incre_rank_num``).
      interval: steps between growths (``incre_interval``), >= 1.
      warmup: steps before the first growth (``init_warmup``), >= 0.
      top_h: modules selected per growth, >= 1.
      beta1, beta2: EMA factors of the sensitivity and its uncertainty, in (0, 1).
    """

    rank: int = 2
    max_rank: int = 8
    alpha: float = 2.0
    target_rank: int = 4
    add_rank: int = 2
    interval: int = 10
    warmup: int = 0
    top_h: int = 2
    beta1: float = 0.85
    beta2: float = 0.85

    def training_rules(self) -> tuple[str, ...]:
        """AdamW on the adapter wrapped in the rank-growth procedure (``increlora``)."""
        kw = ", ".join(f"{k}={getattr(self, k)!r}" for k in PROCEDURE_FIELDS)
        return (f"increlora({kw}):/adapter/", "frozen:.*")

    def validate(self, path: str, linear: Linear) -> None:
        check_rank(path, linear, self.max_rank, min(linear.fan_in, linear.fan_out), name="max_rank")
        check_rank(path, linear, self.rank, self.max_rank)
        _check_procedure(self, path)

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> IncreLoRAAdapter:
        self.validate(path, linear)
        return IncreLoRAAdapter(linear, self.rank, self.max_rank, self.alpha / self.rank, rngs=rngs)


PROCEDURE_FIELDS = ("target_rank", "add_rank", "interval", "warmup", "top_h", "beta1", "beta2")


def _check_procedure(cfg, where: str) -> None:
    def check(field, ok, want):
        check_field(f"increlora at {where!r}", cfg, field, ok, want)

    rank, top = getattr(cfg, "rank", 1), getattr(cfg, "max_rank", None)
    t, add = cfg.target_rank, cfg.add_rank
    ok = is_int(t) and t >= rank and not (top and t > top)
    check("target_rank", ok, f"an int in [rank={rank}, max_rank={top}]")
    ok = is_int(add) and add >= 1 and not (top and add > max(top - rank, 1))
    check("add_rank", ok, f"an int in [1, max_rank - rank = {top and top - rank}]")
    for f, lo in (("interval", 1), ("warmup", 0), ("top_h", 1)):
        check(f, is_int(getattr(cfg, f)) and getattr(cfg, f) >= lo, f"an int >= {lo}")
    for f in ("beta1", "beta2"):
        v = getattr(cfg, f)
        check(f, is_number(v) and 0.0 < v < 1.0, "in (0, 1)")


class IncreLoRAAdapter(nnx.Module):
    """The IncreLoRA adapter of one ``Linear``: ``a`` [*in, R], ``e`` [R], ``b`` [R, *out],
    ``active`` [R] (0/1, written by the procedure), ``ipt`` [] (the importance tap; its value is
    never read), all fp32 ``AdapterParam``; see the module docstring."""

    def __init__(self, linear: Linear, rank: int, max_rank: int, scale: float, *, rngs):
        in_ax, out_ax = kernel_axes(linear)
        self.n_in = len(linear.in_shape)
        self.scale = float(scale)
        fi = linear.fan_in
        z = 0.02 * jax.random.normal(rngs.params(), (max_rank, fi + linear.fan_out), jnp.float32)
        a = z[:, :fi].T.reshape(linear.in_shape + (max_rank,))
        b = z[:, fi:].reshape((max_rank,) + linear.out_shape)
        self.a = factor(a, in_ax + (RANK_AXIS,))
        self.e = factor(jnp.zeros((max_rank,)), (RANK_AXIS,))
        self.b = factor(b, (RANK_AXIS,) + out_ax)
        self.active = factor(jnp.arange(max_rank) < rank, (RANK_AXIS,))
        self.ipt = factor(jnp.zeros(()), ())

    def _masked(self, a, e, b, active):
        on = jax.lax.stop_gradient(active) > 0
        a = jnp.where(on, a, 0.0)
        b = jnp.where(on.reshape((-1,) + (1,) * (b.ndim - 1)), b, 0.0)
        return a, jnp.where(on, e, 0.0), b

    def _delta(self, active, x, a, e, b):
        a, e, b = self._masked(a, e, b, active)
        z = contract(x, a, self.n_in) * e.astype(x.dtype)
        return jnp.asarray(self.scale, x.dtype) * contract(z, b, 1)

    def _stat(self, active, args, cts, dy):
        x, a, e, b = args
        a, e, b = self._masked(a, e, b, active)
        return TAP_SCALE * module_score(self.scale * outer(a * e, b), x, dy)

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` [..., *out] of ``x`` [..., *in] (active components only); ``base`` unused."""
        args = (x, self.a[...], self.e[...], self.b[...])
        return tapped(self._delta, self._stat, self.ipt[...], self.active[...], *args)

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` [*in, *out] = s·a·diag(e ⊙ m)·b in fp32."""
        a, e, b = self._masked(self.a[...], self.e[...], self.b[...], self.active[...])
        return self.scale * outer(a * e, b)


def module_score(dk: jax.Array, x: jax.Array, dy: jax.Array) -> jax.Array:
    """S = Σ |ΔK ⊙ (xᵀ·dy)| / sqrt(#ΔK) (fp32 scalar) for ΔK [*in, *out], x [..., *in] and the
    output cotangent dy [..., *out] (the sum over every leading axis forms ∂L/∂ΔK)."""
    k = _n_lead(x, dk, dy)
    g = jnp.tensordot(x.astype(jnp.float32), dy.astype(jnp.float32), (tuple(range(k)),) * 2)
    return jnp.sum(jnp.abs(dk * g)) / math.sqrt(dk.size)


def _n_lead(x, dk, dy) -> int:
    """The number of leading (batch) axes of x and dy: x.ndim + dy.ndim - dk.ndim halves."""
    return (x.ndim + dy.ndim - dk.ndim) // 2


def active_ranks(model: nnx.Module) -> dict[str, int]:
    """``{adapter prefix path: active rank}`` of every IncreLoRA adapter of ``model``."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    out = {}
    for prefix, idx in modules_with(state, "ipt").items():
        if "active" in idx:
            out[prefix.rstrip("/")] = int(jnp.sum(leaves[idx["active"]][1]))
    return out


def increlora_procedure(
    inner: optax.GradientTransformation,
    *,
    target_rank: int,
    add_rank: int,
    interval: int,
    warmup: int = 0,
    top_h: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> optax.GradientTransformation:
    """IncreLoRA's rank growth around ``inner`` (e.g. AdamW), as one optax transform.

    Every IncreLoRA adapter in the tree (a prefix ``.../adapter/[adapters/NAME/]`` holding
    ``a``, ``e``, ``b``, ``active``, ``ipt``) is a module. Per step: the module scores S are the
    ``ipt`` gradients (the tap, ÷ ``TAP_SCALE``); while the total active rank is below the
    budget B = ``target_rank`` x #modules, Ī, Ū are updated (AdaLoRA EMAs) and at steps t
    (1-based) with t > warmup and t % interval == 0 the min(top_h, (B − total) // add_rank)
    modules of highest Ī·Ū with room for ``add_rank`` more components grow by ``add_rank``. The
    inner updates of ``a``, ``e``, ``b`` are masked to the active components (before growth),
    ``active`` is written with the new mask and ``ipt`` stays 0; other leaves pass through.

    Raises:
      ValueError: bad hyper-parameters (named); at init, no IncreLoRA adapter in the params.
    """
    _check_procedure(
        dataclasses.make_dataclass("P", PROCEDURE_FIELDS)(
            target_rank, add_rank, interval, warmup, top_h, beta1, beta2
        ),
        "increlora_procedure",
    )

    def modules(tree):
        mods = modules_with(tree, "ipt")
        if not mods or any(not {"a", "e", "b", "active", "ipt"} <= set(ix) for ix in mods.values()):
            raise ValueError("increlora_procedure: no IncreLoRA adapter (a, e, b, active, ipt)")
        return mods

    def init(params):
        m = len(modules(params))
        zeros = jnp.zeros((m,), jnp.float32)
        return (inner.init(params), jnp.zeros([], jnp.int32), zeros, zeros)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("increlora_procedure needs params in update(updates, state, params)")
        inner_state, count, ema_ipt, ema_unc = state
        mods = modules(params)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = jax.tree.leaves(params)
        u_leaves, inner_state = inner.update(updates, inner_state, params)
        u_leaves = jax.tree.leaves(u_leaves)
        ix = list(mods.values())
        act = [p_leaves[i["active"]] for i in ix]
        n_act = jnp.stack([jnp.sum(x) for x in act]).astype(jnp.int32)
        rmax = jnp.asarray([x.shape[0] for x in act], jnp.int32)
        budget = int(target_rank) * len(ix)
        total = jnp.sum(n_act)
        growing = total < budget
        s = jnp.stack([g_leaves[i["ipt"]].astype(jnp.float32) for i in ix]) / TAP_SCALE
        new_ipt = beta1 * ema_ipt + (1 - beta1) * s
        new_unc = beta2 * ema_unc + (1 - beta2) * jnp.abs(s - new_ipt)
        ema_ipt = jnp.where(growing, new_ipt, ema_ipt)
        ema_unc = jnp.where(growing, new_unc, ema_unc)
        t = count + 1
        room = n_act + add_rank <= rmax
        score = jnp.where(room, ema_ipt * ema_unc, -jnp.inf)
        h = min(int(top_h), len(ix))
        _, top = jax.lax.top_k(score, h)
        k = jnp.minimum(h, (budget - total) // add_rank)
        chosen = jnp.zeros((len(ix),), bool).at[top].set(jnp.arange(h) < k)
        chosen = chosen & room & growing & (t > warmup) & (t % interval == 0)
        n_new = n_act + add_rank * chosen.astype(jnp.int32)
        out = list(u_leaves)
        for j, i in enumerate(ix):
            on = act[j] > 0
            out[i["a"]] = jnp.where(on, u_leaves[i["a"]], 0.0).astype(u_leaves[i["a"]].dtype)
            ub = u_leaves[i["b"]]
            on_b = on.reshape((-1,) + (1,) * (ub.ndim - 1))
            out[i["b"]] = jnp.where(on_b, ub, 0.0).astype(ub.dtype)
            out[i["e"]] = jnp.where(on, u_leaves[i["e"]], 0.0).astype(u_leaves[i["e"]].dtype)
            new_mask = (jnp.arange(act[j].shape[0]) < n_new[j]).astype(act[j].dtype)
            out[i["active"]] = (new_mask - act[j]).astype(u_leaves[i["active"]].dtype)
            out[i["ipt"]] = jnp.zeros_like(u_leaves[i["ipt"]])
        return jax.tree.unflatten(treedef, out), (inner_state, t, ema_ipt, ema_unc)

    return optax.GradientTransformation(init, update)
