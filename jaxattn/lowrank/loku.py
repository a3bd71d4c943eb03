"""LoKU: low-rank knowledge unlearning, the inverted hinge loss and FILA initialization.

Cha, Cho, Hwang, Lee, "Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs"
(ICLR 2025, arXiv:2408.06621). Two pieces, as functions:

**Inverted Hinge Loss** (:func:`inverted_hinge_loss`), on the forget set: for each target token
x_t with next-token distribution p = softmax(logits_t) [V],

    IHL_t = 1 + p(x_t) − max_{v ≠ x_t} p(v)          (in [0, 2]),

averaged over the valid tokens: it pushes the probability of the unwanted token below that of
the best other token (a hinge with the margin inverted) instead of raising its NLL without
bound as gradient ascent does, so the model keeps a likely alternative.

**FILA** (Fisher-Initialized Low-rank Adaptation, :func:`fila_factors`): the LoRA starts from
the low-rank part of W that matters for the forget set relative to the retain set. With the
empirical Fisher F = mean_x (∂ℓ(x)/∂W)² (:func:`empirical_fisher`) on the forget (F_f) and
retain (F_r) sets, the relative importance is F̂ = F_f / (F_r + eps), and FILA solves the
Fisher-weighted approximation ``min ‖√F̂ ⊙ (W − ΔW)‖`` in closed form with row-wise weights
(Hsu et al. 2022, FWSVD): per output feature o (a row of PyTorch's [out, in] weight, a column
of this repo's [in, out] kernel) the importance i_o = sqrt(Σ_in F̂[in, o]), and

    W·diag(i) = U S Vᵀ  (SVD),   ΔW* = U_r S_r V_rᵀ · diag(1/i)

(the best rank r for ‖(W − ΔW)·diag(i)‖_F, by Eckart-Young on W·diag(i)),

split as LoRA factors ``a = U_r √(S_r/s)`` [in, r], ``b = √(S_r/s) V_rᵀ diag(1/i)`` [r, out]
(s = alpha / r; this even split of S between the factors is our choice, as PiSSA's) and the
base becomes W_res = W − s·a·b, so the model is unchanged at init. With uniform F̂ it is the
truncated SVD (PiSSA's principal part); at full rank s·a·b = W.

:func:`fila_apply` does this on a model's projections (LoRA adapters via ``lowrank.apply``,
then factors and residual base written). LoKU trains the adapter with IHL on the forget set
(plus the retain-set loss when one is used). As an adapter method, ``loku``
(``methods/loku.py``) runs both in ``train.finetune`` by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "inverted_hinge_loss",
    "empirical_fisher",
    "relative_fisher",
    "fila_factors",
    "weighted_error",
    "fila_apply",
    "fila_init",
]


def inverted_hinge_loss(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT=None) -> jax.Array:
    """Mean over valid tokens of ``1 + p(x_t) − max_{v≠x_t} p(v)`` (module docstring), fp32.

    Args:
      logits_BTV: [B, T, V] next-token logits; targets_BT: int [B, T] the forget tokens;
      mask_BT: [B, T] 1 for tokens counted (None: all).
    """
    if logits_BTV.ndim != 3 or targets_BT.shape != logits_BTV.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and targets [B, T], got {logits_BTV.shape} and "
            f"{targets_BT.shape}"
        )
    if not jnp.issubdtype(targets_BT.dtype, jnp.integer):
        raise ValueError(f"targets_BT must be integer token ids, got {targets_BT.dtype}")
    p = jax.nn.softmax(logits_BTV.astype(jnp.float32), axis=-1)
    hot = jax.nn.one_hot(targets_BT, p.shape[-1], dtype=bool)
    p_true = jnp.sum(jnp.where(hot, p, 0.0), axis=-1)
    p_other = jnp.max(jnp.where(hot, -jnp.inf, p), axis=-1)
    ihl = 1.0 + p_true - p_other
    if mask_BT is None:
        return jnp.mean(ihl)
    m = jnp.asarray(mask_BT, jnp.float32)
    if m.shape != ihl.shape:
        raise ValueError(f"mask_BT must be {ihl.shape}, got {m.shape}")
    return jnp.sum(ihl * m) / jnp.maximum(jnp.sum(m), 1.0)


def empirical_fisher(loss_fn, params, examples, *, grad_fn=None):
    """Diagonal empirical Fisher ``mean_x (∂ loss_fn(params, x)/∂params)²`` over ``examples``
    (an iterable of per-example inputs), a pytree like ``params`` (fp32).

    ``grad_fn``: a compiled ``(params, x) -> ∂loss/∂params`` used instead of compiling
    ``jax.grad(loss_fn)`` on every call (callers that repeat the estimate pass one; ``loss_fn``
    is then unused and may be None)."""
    if grad_fn is None:
        if loss_fn is None:
            raise ValueError("empirical_fisher needs loss_fn or grad_fn")
        grad_fn = jax.jit(jax.grad(loss_fn))
    total, n = None, 0
    for x in examples:
        g = jax.tree.map(lambda v: jnp.square(v.astype(jnp.float32)), grad_fn(params, x))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        n += 1
    if n == 0:
        raise ValueError("empirical_fisher needs at least one example")
    return jax.tree.map(lambda v: v / n, total)


def relative_fisher(fisher_forget, fisher_retain, eps: float = 1e-8):
    """F̂ = F_f / (F_r + eps), elementwise (pytrees or arrays)."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return jax.tree.map(lambda f, r: f / (r + eps), fisher_forget, fisher_retain)


def _row_importance(importance_IO, eps):
    return jnp.sqrt(jnp.sum(importance_IO.astype(jnp.float32), axis=0) + eps)  # [O]


def fila_factors(w_IO, importance_IO, rank: int, *, alpha: float | None = None, eps=1e-12):
    """FILA's LoRA factors of one weight (module docstring).

    Args:
      w_IO: the kernel as a matrix [in, out]; importance_IO: F̂ [in, out] (>= 0);
      rank: r in [1, min(in, out)]; alpha: s = alpha / r (default alpha = r, s = 1).

    Returns:
      (a [in, r], b [r, out], w_res [in, out]) with ``w_res + s·a·b = w`` (fp32).
    """
    if w_IO.ndim != 2 or importance_IO.shape != w_IO.shape:
        raise ValueError(
            f"w must be [in, out] and importance the same, got {w_IO.shape}, {importance_IO.shape}"
        )
    top = min(w_IO.shape)
    if not isinstance(rank, int) or not 1 <= rank <= top:
        raise ValueError(f"rank must be an int in [1, {top}], got {rank!r}")
    s = 1.0 if alpha is None else float(alpha) / rank
    if s <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    w = w_IO.astype(jnp.float32)
    i_o = _row_importance(importance_IO, eps)
    u, sv, vh = jnp.linalg.svd(w * i_o[None, :], full_matrices=False)
    root = jnp.sqrt(sv[:rank] / s)
    a = u[:, :rank] * root[None, :]
    b = (root[:, None] * vh[:rank]) / i_o[None, :]
    return a, b, w - s * (a @ b)


def weighted_error(w_IO, approx_IO, importance_IO, *, rowwise: bool = True, eps=1e-12):
    """‖(W − ΔW)·diag(i)‖_F (``rowwise``: the objective FILA solves exactly) or the
    elementwise ‖√F̂ ⊙ (W − ΔW)‖_F."""
    d = (w_IO - approx_IO).astype(jnp.float32)
    if rowwise:
        return jnp.linalg.norm(d * _row_importance(importance_IO, eps)[None, :])
    return jnp.linalg.norm(jnp.sqrt(importance_IO.astype(jnp.float32)) * d)


def fila_apply(model, importance: dict, *, rank: int, alpha: float | None = None, name="default"):
    """Attach FILA-initialized LoRA (``lora`` adapters named ``name``) to the projections in
    ``importance`` ({path: F̂ [*in, *out]}) and write each residual base W_res.

    Returns the adapted paths. The adapters are plain ``lora`` ones (saved and merged as such);
    their base is W_res, so reloading them needs this model's rewritten kernels.
    """
    from jaxattn.lowrank._apply import AdapterConfig
    from jaxattn.lowrank._apply import apply as lr_apply
    from jaxattn.lowrank._surgery import linear_paths

    lins = linear_paths(model)
    missing = sorted(set(importance) - set(lins))
    if missing:
        raise ValueError(f"importance names no projection at {missing}")
    alpha = float(rank) if alpha is None else float(alpha)
    opts = {"rank": rank, "alpha": alpha, "init": "zero"}
    pattern = "^(" + "|".join(sorted(importance)) + ")$"
    lr_apply(model, AdapterConfig("lora", opts, targets=pattern, name=name), rngs=nnx.Rngs(0))
    return fila_init(model, importance, name=name)


def fila_init(model, importance: dict, *, name: str = "default") -> list[str]:
    """Write FILA's factors into the LoRA adapters ``name`` already on the projections in
    ``importance`` ({path: F̂ [*in, *out]}), and each residual base W_res = W − s·a·b (s the
    adapter's own scaling, rsLoRA included), so the model's output is unchanged.

    Returns the written paths. Raises ``ValueError``: a path with no plain LoRA ``name``.
    """
    from jaxattn.lowrank._apply import _write_kernel
    from jaxattn.lowrank._surgery import linear_paths
    from jaxattn.lowrank.methods.lora import LoRAAdapter

    lins = linear_paths(model)
    done = []
    for p in sorted(importance):
        lin = lins.get(p)
        ads = getattr(getattr(lin, "adapter", None), "adapters", {})
        ad = ads.get(name) if hasattr(ads, "get") else None
        if not isinstance(ad, LoRAAdapter) or ad.use_dora:
            raise ValueError(f"fila_init: {p!r} holds no plain LoRA adapter named {name!r}")
        r = ad.a.shape[-1]
        w = lin.base_kernel(jnp.float32).reshape(lin.fan_in, lin.fan_out)
        imp = jnp.asarray(importance[p]).reshape(lin.fan_in, lin.fan_out)
        a, b, w_res = fila_factors(w, imp, r, alpha=ad.scaling * r)
        ad.a[...] = a.reshape(ad.a.shape)
        ad.b[...] = b.reshape(ad.b.shape)
        _write_kernel(lin, w_res, p)
        done.append(p)
    return done
