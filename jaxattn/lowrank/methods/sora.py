"""SoRA: LoRA with a gate vector between its factors, sparsified by a proximal step.

Ding, Lv, Wang, Chen, Liu, Zhao, Sun, "Sparse Low-rank Adaptation of Pre-trained Language
Models" (EMNLP 2023, arXiv:2311.11696). The adapter is initialized at a high rank r with a gate
g [r] between the factors,

    Δy = s · ((x·a) ⊙ g)·b                 ΔK = s · a·diag(g)·b     (s = alpha / rank)

a [*in, r] (LoRA init), g = 1, b [r, *out] = 0 (an exact no-op). The gate is trained with a
proximal gradient step for an L1 penalty λ‖g‖₁: after the optimizer's own update,

    g ← sign(g') · max(|g'| − λ·η, 0),     g' = g + Δg,

(:func:`sora_proximal`), which drives gates to exactly 0; a component with g_i = 0 contributes
exactly nothing and can be pruned, so the intrinsic rank is #nonzero(g). With λ = 0 the step
is the identity and SoRA trains as LoRA (with a gate). ``sticky=True`` (default) keeps a gate
that reached 0 at 0, so the effective rank never increases; the bare proximal step
(``sticky=False``) lets a gradient revive a pruned gate.
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

__all__ = ["SoRAConfig", "SoRAAdapter", "sora_proximal", "effective_rank"]


@register_method("sora")
@dataclasses.dataclass(frozen=True)
class SoRAConfig(MethodConfig):
    """SoRA's hyper-parameters.

    Attributes:
      rank: the initial (maximum) rank r, 1 <= r <= min(d_in, d_out).
      alpha: scale numerator (scale alpha / rank).
      lam: the L1 strength λ of the gate's proximal step (the official code's
        ``sparse_lambda``) that ``train.finetune`` runs (:meth:`training_rules`).
    """

    rank: int = 8
    alpha: float = 8.0
    lam: float = 0.1

    def training_rules(self) -> tuple[str, ...]:
        """AdamW on the adapter, then the proximal gate step (``train.adapter_procedures``):
        the official code's SparseAdamW, an AdamW step followed by the L1 proximal map."""
        return (f"sora(lam={float(self.lam)!r}):/adapter/", "frozen:.*")

    def validate(self, path: str, linear: Linear) -> None:
        check_rank(path, linear, self.rank, min(linear.fan_in, linear.fan_out))

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> SoRAAdapter:
        self.validate(path, linear)
        return SoRAAdapter(linear, self.rank, self.alpha / self.rank, rngs=rngs)


class SoRAAdapter(nnx.Module):
    """The SoRA adapter of one ``Linear``: ``a`` [*in, r], ``gate`` [r], ``b`` [r, *out] (fp32
    ``AdapterParam``; see the module docstring)."""

    def __init__(self, linear: Linear, rank: int, scale: float, *, rngs: nnx.Rngs):
        in_ax, out_ax = kernel_axes(linear)
        self.n_in = len(linear.in_shape)
        self.scale = float(scale)
        self.a = factor(down_init(rngs.params(), linear.in_shape, rank), in_ax + (RANK_AXIS,))
        self.gate = factor(jnp.ones((rank,)), (RANK_AXIS,))
        self.b = factor(jnp.zeros((rank,) + linear.out_shape), (RANK_AXIS,) + out_ax)

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` [..., *out] of ``x`` [..., *in] in x's dtype (``base`` unused)."""
        z_R = contract(x, self.a[...], self.n_in) * self.gate[...].astype(x.dtype)
        return jnp.asarray(self.scale, x.dtype) * contract(z_R, self.b[...], 1)

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` [*in, *out] = s·a·diag(g)·b in fp32."""
        return self.scale * outer(self.a[...] * self.gate[...], self.b[...])


def effective_rank(adapter: SoRAAdapter) -> int:
    """The number of nonzero gates (the adapter's intrinsic rank)."""
    return int(jnp.count_nonzero(adapter.gate[...]))


def _leaf_path(path) -> str:
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
    while names and names[-1] in ("value", "raw_value"):  # an nnx Variable's own field
        names.pop()
    return "/".join(names)


_GATE_PATH = re.compile(r"(^|/)adapter/(adapters/[^/]+/)?gate$")


def sora_proximal(
    lam: float, lr: float | optax.Schedule, *, sticky: bool = True
) -> optax.GradientTransformation:
    """The SoRA proximal step on the gate leaves, to chain after the inner optimizer.

    ``optax.chain(optax.sgd(lr), sora_proximal(lam, lr))``: every SoRA gate leaf, whose
    ``/``-joined path ends in ``adapter/gate`` (an adapter in a ``Linear``'s slot) or
    ``adapter/adapters/NAME/gate`` (a named adapter of ``lowrank.apply``), and no other leaf
    (not e.g. a router named ``gate``), gets ``g ← sign(g + u)·max(|g + u| − lam·lr, 0)``
    (u its inner update); other leaves pass through. Needs ``params`` in ``update``.

    Args:
      lam: the L1 strength λ >= 0 (0: the identity).
      lr: the learning rate η of the inner update (the threshold is λ·η), or the inner
        update's schedule ``η(t)`` (then the state counts steps as ``scale_by_schedule``
        does, so the threshold at step t is λ·η(t), the rate the inner update used).
      sticky: keep a gate that is exactly 0 at 0 (effective rank non-increasing).

    Raises:
      ValueError: negative ``lam`` or non-positive ``lr``; at update, no ``params``.
    """
    if not lam >= 0:
        raise ValueError(f"lam={lam!r} must be >= 0")
    scheduled = callable(lr)
    if not scheduled and not lr > 0:
        raise ValueError(f"lr={lr!r} must be > 0 (or a schedule)")

    def init(params):
        del params
        if scheduled:
            return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("sora_proximal needs params in update(updates, state, params)")
        if scheduled:
            thresh = float(lam) * lr(state.count)
            state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
        else:
            thresh = float(lam) * float(lr)

        def one(path, u, p):
            name = _leaf_path(path)
            if not _GATE_PATH.search(name):
                return u
            new = p + u
            new = jnp.sign(new) * jnp.maximum(jnp.abs(new) - thresh, 0.0)
            if sticky:
                new = jnp.where(p == 0, jnp.zeros_like(new), new)
            return (new - p).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformation(init, update)
