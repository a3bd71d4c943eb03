"""GaLore and Fira: gradient low-rank projection around any optax transform.

GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", 2024). For a selected leaf viewed as the matrix ``G_mn`` (see ``_plan``) with a
left projector ``P_mr`` (or a right one ``Q_rn``, or both)::

    every T steps (t % T == 0, t = 0, 1, ...):  P = top-r basis of G_t   (projectors.py)
    R_t = Pᵀ G_t                     [r, n]     (right: G_t Qᵀ [m, r]; both: Pᵀ G_t Qᵀ [r, r])
    N_t = inner(R_t)                 inner's state lives in R's shape
    ΔW_t = scale · P N_t             (right: N_t Q; both: P N_t Q)

The refresh is a ``lax.cond`` on the step count inside the compiled update: no host round trip
and no recompilation. Moments are kept across refreshes (as galore-torch does). Leaves not
selected (and leaves with < 2 dims) go to ``inner`` unchanged, unscaled; identity leaves (a
square projector, e.g. rank == min(m, n) with ``std``) go to ``inner`` unprojected and are
scaled, so at full rank GaLore with ``scale=1`` *is* its inner transform.

Fira (Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?", 2024) adds the out-of-subspace residual ``S_t = G_t − P R_t`` (``G_t − R_t Q``)
scaled per column (per row for a right projection) of ``R`` by the inner transform's gain::

    φ_j = ‖N_t[:, j]‖ / (‖R_t[:, j]‖ + 1e-8)          (the norm over R's rank axis)
    S̃_t = φ ⊙ S_t;  limiter: λ = max(‖S̃_t‖ / (ζ_{t−1} + 1e-8), γ) / γ,  S̃_t /= λ,  ζ_t = ‖S̃_t‖
    ΔW_t = scale · P N_t + S̃_t                        (step 0: no limiter, ζ_0 = ‖S̃_0‖)

as the official code (github.com/xichen-fy/Fira, ``fira_adamw.py``) does, except that the
residual is the true out-of-subspace part ``G − P R``; the official code subtracts
``scale · P R`` (the same when ``scale = 1``). With ``inner =
scale_by_adam_galore_torch(correct_bias=False)`` and ``scale = 1`` this is FiraAdamW exactly.

State (:class:`GaLoreState`): ``count`` int32; ``left`` / ``right`` trees like the
parameters holding each leaf's projector (``P_mr`` / ``Q_rn`` in ``projector_dtype``, or
int32 ``[r]`` indices for the DCT projector; a ``MaskedNode`` where the leaf has none);
``fira_norm`` (fp32 ``[]`` per projected leaf, Fira only); ``inner`` (inner's state over the
projected shapes).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxattn.optim import projectors as _proj
from jaxattn.optim._plan import FanIn, Rank, check_proj_type, flatten, leaves, make_plans
from jaxattn.optim.quantized import quantize_state

__all__ = ["GaLoreState", "galore", "fira", "scale_by_adam_galore_torch"]


class GaLoreState(NamedTuple):
    """State of :func:`galore` / :func:`fira` (module docstring)."""

    count: jax.Array
    left: Any
    right: Any
    fira_norm: Any
    inner: optax.OptState


def scale_by_adam_galore_torch(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, *, correct_bias: bool = True
) -> optax.GradientTransformation:
    """Adam as galore-torch's ``AdamW`` (and Hugging Face's old ``AdamW``) computes it.

    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g²``, ``u = c_t · m / (sqrt(v) + eps)`` with
    ``c_t = sqrt(1 - b2^t) / (1 - b1^t)`` (1 without ``correct_bias``): eps is added to the
    *uncorrected* ``sqrt(v)``, unlike ``optax.scale_by_adam`` (``m̂ / (sqrt(v̂) + eps)``).
    Chain ``optax.scale(-lr)`` after it (after GaLore when wrapped). galore-torch applies
    weight decay to the already-updated weight, ``(W − lr u)(1 − lr wd)``; optax's
    ``add_decayed_weights`` uses the weight before the update (they differ by ``lr² wd u``).

    State: ``optax.ScaleByAdamState(count, mu, nu)``, ``mu`` and ``nu`` like the updates.
    """
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p)
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m * b1 + g * (1 - b1), state.mu, updates)
        nu = jax.tree.map(lambda v, g: v * b2 + (g * g) * (1 - b2), state.nu, updates)
        count = optax.safe_increment(state.count)
        step = 1.0
        if correct_bias:  # 1 - b^t as -expm1(t log b): exact in fp32 where 1 - b**t is not
            t = count.astype(jnp.float32)
            step = jnp.sqrt(-jnp.expm1(t * log_b2)) / -jnp.expm1(t * log_b1)
        out = jax.tree.map(lambda m, v: (step * (m / (jnp.sqrt(v) + eps))).astype(m.dtype), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def galore(
    inner: optax.GradientTransformation,
    *,
    rank: Rank,
    update_proj_gap: int,
    scale: float = 1.0,
    proj_type: str = "std",
    projector="svd",
    fan_in_axes: FanIn = 1,
    mask=None,
    moment_bits: int = 32,
    projector_dtype=None,
) -> optax.GradientTransformation:
    """GaLore around ``inner`` (module docstring for the equations and the state).

    Typical use (the paper's recipe: ``optax.scale(-lr)`` after; weight decay, when used,
    full-rank between the two)::

        tx = optax.chain(galore(scale_by_adam_galore_torch(), rank=128, update_proj_gap=200,
                                scale=0.25), optax.scale(-1e-2))

    Args:
      inner: the transform run on the projected gradients (and on every leaf not projected).
        Its ``params`` argument is None: put transforms that need the weights outside.
      rank: an int for every leaf with >= 2 dims, or ``rank(path, shape) -> int | None``
        (None: the leaf is not projected); paths read ``"layers/0/mlp/up/kernel"``.
      update_proj_gap: T, the projector is recomputed at steps 0, T, 2T, ...
      scale: α, multiplies the projected-back update (the paper uses 0.25).
      proj_type: which side(s) of the matrix view are projected (``_plan.PROJ_TYPES``).
      projector: ``"svd"`` | ``"randomized"`` | ``"dct"`` or an ``SVD()``,
        ``Randomized(oversample, power_iters, seed)``, ``DCT()`` instance.
      fan_in_axes: leading dims forming the matrix rows (an int, or ``(path, shape) -> int``);
        a ``[*in, *out]`` leaf is viewed as ``[prod(in), prod(out)]``. Default 1.
      mask: optional tree of bools (or ``params -> tree``): False leaves are not projected.
      moment_bits: 32, or 8 to store ``inner``'s state block-wise quantised
        (:func:`quantize_state`; projectors stay in ``projector_dtype``).
      projector_dtype: dtype of the stored ``P``/``Q`` (default: the parameter's).

    Raises:
      ValueError: ``update_proj_gap`` <= 0, an unknown ``proj_type`` or ``projector``, a bad
        ``moment_bits``; at ``init``: a rank outside [1, min(m, n)] (naming the parameter) or a
        selection that projects nothing.
    """
    return _projected(
        inner, rank, update_proj_gap, scale, proj_type, projector, fan_in_axes, mask,
        moment_bits, projector_dtype, gamma=None, who="galore",
    )  # fmt: skip


def fira(
    inner: optax.GradientTransformation,
    *,
    rank: Rank,
    update_proj_gap: int,
    scale: float = 1.0,
    gamma: float = 1.01,
    proj_type: str = "std",
    projector="svd",
    fan_in_axes: FanIn = 1,
    mask=None,
    moment_bits: int = 32,
    projector_dtype=None,
) -> optax.GradientTransformation:
    """Fira around ``inner``: GaLore plus the norm-scaled, norm-growth-limited residual.

    Arguments as :func:`galore`, plus ``gamma`` (γ >= 1, the limiter's largest allowed growth
    of the residual's norm per step; the paper's 1.01). ``proj_type="full"`` is refused
    (Fira's scaling is per column of a one-sided projection). The limiter acts on what
    ``inner`` outputs: with a bias-corrected inner its ratio includes the change of the bias
    correction between steps (the official code limits the uncorrected residual).

    Raises:
      ValueError: as :func:`galore`, ``gamma`` < 1, or a leaf projected on both sides.
    """
    if not gamma >= 1.0:
        raise ValueError(f"gamma={gamma!r} must be >= 1 (the largest allowed norm growth)")
    return _projected(
        inner, rank, update_proj_gap, scale, proj_type, projector, fan_in_axes, mask,
        moment_bits, projector_dtype, gamma=gamma, who="fira",
    )  # fmt: skip


def _check(update_proj_gap, proj_type, moment_bits, scale) -> None:
    if (
        isinstance(update_proj_gap, bool)
        or not isinstance(update_proj_gap, int)
        or update_proj_gap <= 0
    ):
        raise ValueError(f"update_proj_gap={update_proj_gap!r} must be a positive int")
    check_proj_type(proj_type)
    if moment_bits not in (8, 32):
        raise ValueError(f"moment_bits={moment_bits!r} must be 8 or 32")
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be finite")


def _fira_residual(g_mn, low, n_low, back, norm_prev, first, gamma):
    """Fira's scaled, limited residual and the new ζ (module docstring)."""
    axis = 0 if low.shape[0] < low.shape[1] else 1  # the rank axis of R (official rule)
    phi = jnp.linalg.norm(n_low, axis=axis, keepdims=True) / (
        jnp.linalg.norm(low, axis=axis, keepdims=True) + 1e-8
    )
    s = (g_mn - back(low)) * phi
    norm = jnp.linalg.norm(s.astype(jnp.float32))
    limiter = jnp.maximum(norm / (norm_prev + 1e-8), gamma) / gamma
    s = jnp.where(first, s, s / limiter.astype(s.dtype))
    return s, jnp.where(first, norm, norm / limiter)


def _projected(
    inner, rank, update_proj_gap, scale, proj_type, projector, fan_in_axes, mask,
    moment_bits, projector_dtype, *, gamma, who,
) -> optax.GradientTransformation:  # fmt: skip
    _check(update_proj_gap, proj_type, moment_bits, scale)
    proj = _proj.resolve(projector)
    if moment_bits == 8:
        inner = quantize_state(inner)
    seed = getattr(proj, "seed", 0)

    def plans_of(tree):
        plans = make_plans(
            tree, rank=rank, fan_in_axes=fan_in_axes, proj_type=proj_type, mask=mask, who=who
        )
        if gamma is not None:
            for p in plans:
                if p is not None and p.left and p.right:
                    raise ValueError(
                        f"fira: proj_type={proj_type!r} projects both sides of {p.path!r}; Fira's "
                        "norm-based scaling needs a one-sided projection"
                    )
        return plans

    def init_fn(params):
        _, xs, treedef = flatten(params)
        lefts, rights, norms, lows = [], [], [], []
        for plan, x in zip(plans_of(params), xs):
            if plan is None or plan.identity:
                lefts.append(optax.MaskedNode()), rights.append(optax.MaskedNode())
                norms.append(optax.MaskedNode()), lows.append(x)
                continue
            left, right = proj.init(plan, projector_dtype or x.dtype)
            (
                lefts.append(left),
                rights.append(right),
                lows.append(jnp.zeros(plan.low_shape, x.dtype)),
            )
            norms.append(jnp.zeros([], jnp.float32) if gamma is not None else optax.MaskedNode())
        tree = treedef.unflatten
        return GaLoreState(
            jnp.zeros([], jnp.int32), tree(lefts), tree(rights), tree(norms), inner.init(tree(lows))
        )

    def update_fn(updates, state, params=None):
        del params
        _, gs, treedef = flatten(updates)
        plans = plans_of(updates)
        old_l, old_r = leaves(state.left), leaves(state.right)

        def renew():
            key = jax.random.fold_in(jax.random.key(seed), state.count)
            new_l, new_r = list(old_l), list(old_r)
            for i, (plan, g) in enumerate(zip(plans, gs)):
                if plan is not None and not plan.identity:
                    g_mn = g.reshape(plan.m, plan.n)
                    new_l[i], new_r[i] = proj.refresh(
                        g_mn, plan, old_l[i], old_r[i], jax.random.fold_in(key, i)
                    )
            return new_l, new_r

        refresh = state.count % update_proj_gap == 0
        lefts, rights = jax.lax.cond(refresh, renew, lambda: (old_l, old_r))

        lows, mats = [], []
        for plan, g, left, right in zip(plans, gs, lefts, rights):
            if plan is None or plan.identity:
                lows.append(g), mats.append(None)
                continue
            p_mr = proj.left_matrix(left, plan, g.dtype) if plan.left else None
            q_rn = proj.right_matrix(right, plan, g.dtype) if plan.right else None
            low = g.reshape(plan.m, plan.n)
            low = p_mr.T @ low if p_mr is not None else low
            low = low @ q_rn.T if q_rn is not None else low
            lows.append(low), mats.append((p_mr, q_rn))
        inner_out, inner_state = inner.update(treedef.unflatten(lows), state.inner)

        norms = leaves(state.fira_norm)
        out = []
        for i, (plan, g, low, n_low) in enumerate(zip(plans, gs, lows, leaves(inner_out))):
            if plan is None:
                out.append(n_low)
                continue
            if plan.identity:
                out.append((scale * n_low).astype(g.dtype))
                continue
            p_mr, q_rn = mats[i]

            def back(y, p_mr=p_mr, q_rn=q_rn):
                y = p_mr @ y if p_mr is not None else y
                return y @ q_rn if q_rn is not None else y

            upd = scale * back(n_low)
            if gamma is not None:
                g_mn = g.reshape(plan.m, plan.n)
                s, norms[i] = _fira_residual(
                    g_mn, low, n_low, back, norms[i], state.count == 0, gamma
                )
                upd = upd + s
            out.append(upd.reshape(plan.shape).astype(g.dtype))
        tree = treedef.unflatten
        new_state = GaLoreState(
            optax.safe_increment(state.count), tree(lefts), tree(rights), tree(norms), inner_state
        )
        return tree(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
