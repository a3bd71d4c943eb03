"""Chained low-rank approximation of the LoRA gradient of one attention head (a reference).

Hu, Su, Chen, Liu, Wu, Liu, "Computational Limits of Low-Rank Adaptation (LoRA) for
Transformer-Based Models" (ICLR 2025, arXiv:2406.03136). The paper's setting: one attention
head on a sequence x [L, D] with LoRA on W_Q and W_V ("partial") or W_Q, W_K, W_V ("full"),
each ``W = W* + s·a·b`` (a [D, r], b [r, out], this repo's [in, out] layout, s = alpha / r),
and the loss

    Q = x·W_Q,  K = x·W_K,  V = x·W_V,   f = D⁻¹·exp(β·Q·Kᵀ)   (softmax rows, [L, L])
    c = f·V − y  [L, Dv],   ℒ = ½‖c‖²_F.

Its gradient is a chain of L x L matrices, each of low rank (the paper's Lemmas):

    G = ∂ℒ/∂f = c·Vᵀ                          rank <= Dv    (U2 = c, V2 = V)
    p = ∂ℒ/∂(βQKᵀ) = f⊙G − diag((f⊙G)·1)·f
    ∂ℒ/∂V = fᵀ·c,  ∂ℒ/∂Q = β·p·K,  ∂ℒ/∂K = β·pᵀ·Q,   ∂ℒ/∂W_· = xᵀ·∂ℒ/∂(·),
    ∂ℒ/∂a = s·(∂ℒ/∂W)·bᵀ,  ∂ℒ/∂b = s·aᵀ·(∂ℒ/∂W).

The nearly linear algorithm never forms an L x L matrix: f ≈ U1·V1ᵀ (rank k), then
c ≈ U1·(V1ᵀ·V) − y, and with the row-wise Kronecker product ⊘ ((U⊘U')ᵢ = Uᵢ ⊗ U'ᵢ),

    f⊙G ≈ (U1⊘U2)·(V1⊘V2)ᵀ,   ρ = (U1⊘U2)·((V1⊘V2)ᵀ·1),
    p ≈ U3·V3ᵀ,  U3 = [U1⊘U2, −ρ⊙U1],  V3 = [V1⊘V2, V1]            (rank k·Dv + k)

so every gradient above is a product of thin matrices, O(L·k·Dv·D). Two ways to get U1, V1:

  * ``kind="svd"``: the best rank-k approximation of f (Eckart-Young; it reads f, so it is a
    reference for the chain's error, not a fast path). Exact at k = L; the error falls with k.
  * ``kind="taylor"`` (the paper's polynomial method, Alman & Song 2023): exp(⟨q, k⟩) ≈
    Σ_{t<=g} ⟨q, k⟩ᵗ / t! = φ(q)·φ(k) with φ(q) = [q^{⊗t} / sqrt(t!)]_{t<=g} (on √β·q, √β·k),
    A ≈ U·Vᵀ, D̃ = diag(U·(Vᵀ·1)), U1 = D̃⁻¹·U, V1 = V. Accurate when the entries of β·QKᵀ are
    small (the paper's norm bound, o(sqrt(log L))); it drifts when they are large.

:func:`approx_lora_loss` is ℒ with this approximate backward (``jax.custom_vjp``; the forward
value is exact; x, W* and y are frozen and get zero cotangents); :func:`gradient_error`
reports the relative Frobenius error of every factor's approximate gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

__all__ = [
    "ChainedApprox",
    "lora_attention_loss",
    "approx_lora_grads",
    "approx_lora_loss",
    "gradient_error",
    "TARGETS",
]

TARGETS = ("q", "k", "v")  # "partial" adaptation: {"q", "v"}; "full": all three


@dataclasses.dataclass(frozen=True)
class ChainedApprox:
    """How f is approximated: ``kind`` "svd" (rank ``rank``) or "taylor" (degree ``degree``);
    ``beta`` the logit scale β (the paper: 1; 1/sqrt(head dim) for standard attention);
    ``alpha``: LoRA s = alpha / r."""

    kind: str = "svd"
    rank: int = 4
    degree: int = 2
    beta: float = 1.0
    alpha: float = 1.0

    def __post_init__(self):
        if self.kind not in ("svd", "taylor"):
            raise ValueError(f"kind must be 'svd' or 'taylor', got {self.kind!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if not isinstance(self.degree, int) or self.degree < 0:
            raise ValueError(f"degree must be an int >= 0, got {self.degree!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")


def _check(factors, x_LD, weights, y_LV):
    if not factors or set(factors) - set(TARGETS) or "q" not in factors:
        raise ValueError(f"factors must adapt 'q' and a subset of {TARGETS}, got {sorted(factors)}")
    if set(weights) != set(TARGETS):
        raise ValueError(f"weights must hold W* for each of {TARGETS}, got {sorted(weights)}")
    if x_LD.ndim != 2 or y_LV.ndim != 2 or y_LV.shape[0] != x_LD.shape[0]:
        raise ValueError(f"x must be [L, D] and y [L, Dv], got {x_LD.shape} and {y_LV.shape}")
    for t, w in weights.items():
        if w.ndim != 2 or w.shape[0] != x_LD.shape[1]:
            raise ValueError(f"weights[{t!r}] must be [D={x_LD.shape[1]}, out], got {w.shape}")
        if t in factors:
            a, b = factors[t]
            if a.shape[0] != w.shape[0] or b.shape[1] != w.shape[1] or a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"factors[{t!r}] must be a [D, r], b [r, out]: {a.shape} {b.shape}"
                )
    if weights["v"].shape[1] != y_LV.shape[1]:
        raise ValueError(f"y must be [L, Dv={weights['v'].shape[1]}], got {y_LV.shape}")


def _project(factors, x_LD, weights, s):
    out = {}
    for t in TARGETS:
        w = weights[t]
        if t in factors:
            a, b = factors[t]
            w = w + s * (a @ b)
        out[t] = x_LD @ w
    return out["q"], out["k"], out["v"]


def lora_attention_loss(factors, x_LD, weights, y_LV, *, beta=1.0, alpha=1.0):
    """ℒ = ½‖softmax(β·Q·Kᵀ)·V − y‖²_F (module docstring); ``factors`` {"q": (a, b), ...},
    ``weights`` {"q"|"k"|"v": W* [D, out]}, x [L, D], y [L, Dv]. Differentiate it with
    ``jax.grad`` for the exact gradient."""
    _check(factors, x_LD, weights, y_LV)
    r = next(iter(factors.values()))[0].shape[1]
    q, k, v = _project(factors, x_LD, weights, alpha / r)
    f = jax.nn.softmax(beta * q @ k.T, axis=-1)
    return 0.5 * jnp.sum(jnp.square(f @ v - y_LV))


def _rowkron(u, w):
    """Row-wise Kronecker product: [L, k] ⊘ [L, m] -> [L, k·m]."""
    return (u[:, :, None] * w[:, None, :]).reshape(u.shape[0], -1)


def _taylor_features(z_LH, degree):
    feats, cur = [jnp.ones((z_LH.shape[0], 1), z_LH.dtype)], jnp.ones((z_LH.shape[0], 1))
    for t in range(1, degree + 1):
        cur = _rowkron(cur, z_LH)
        feats.append(cur / math.sqrt(math.factorial(t)))
    return jnp.concatenate(feats, axis=1)


def attention_factors(q_LH, k_LH, approx: ChainedApprox):
    """(U1 [L, k], V1 [L, k]) with f ≈ U1·V1ᵀ (module docstring: "svd" or "taylor")."""
    if approx.kind == "svd":
        f = jax.nn.softmax(approx.beta * q_LH @ k_LH.T, axis=-1)
        u, sv, vh = jnp.linalg.svd(f, full_matrices=False)
        k = min(approx.rank, sv.shape[0])
        return u[:, :k] * sv[:k], vh[:k].T
    root = math.sqrt(approx.beta)
    u = _taylor_features(root * q_LH, approx.degree)
    w = _taylor_features(root * k_LH, approx.degree)
    d = u @ jnp.sum(w, axis=0)  # D̃ = diag(U·(Vᵀ·1))
    return u / d[:, None], w


def approx_lora_grads(factors, x_LD, weights, y_LV, approx: ChainedApprox):
    """The chained low-rank approximation of ∂ℒ/∂(a, b) for every adapted target, as
    ``{target: (∂a [D, r], ∂b [r, out])}`` (no L x L matrix formed except by kind="svd")."""
    _check(factors, x_LD, weights, y_LV)
    return _approx_grads(factors, x_LD, weights, y_LV, approx)


@functools.partial(jax.jit, static_argnames="approx")
def _approx_grads(factors, x_LD, weights, y_LV, approx):
    r = next(iter(factors.values()))[0].shape[1]
    s = approx.alpha / r
    q, k, v = _project(factors, x_LD, weights, s)
    u1, v1 = attention_factors(q, k, approx)
    c = u1 @ (v1.T @ v) - y_LV  # [L, Dv]
    u12, v12 = _rowkron(u1, c), _rowkron(v1, v)  # f⊙G ≈ u12·v12ᵀ
    rho = u12 @ jnp.sum(v12, axis=0)  # [L]
    u3 = jnp.concatenate([u12, -rho[:, None] * u1], axis=1)
    v3 = jnp.concatenate([v12, v1], axis=1)  # p ≈ u3·v3ᵀ
    d_act = {
        "q": approx.beta * u3 @ (v3.T @ k),
        "k": approx.beta * v3 @ (u3.T @ q),
        "v": v1 @ (u1.T @ c),
    }
    out = {}
    for t, (a, b) in factors.items():
        g_w = x_LD.T @ d_act[t]  # ∂ℒ/∂W [D, out]
        out[t] = (s * g_w @ b.T, s * a.T @ g_w)
    return out


def approx_lora_loss(factors, x_LD, weights, y_LV, approx: ChainedApprox):
    """ℒ (exact value) whose ``jax.grad`` w.r.t. ``factors`` is :func:`approx_lora_grads`;
    x, W* and y get zero cotangents (they are frozen under LoRA)."""

    @jax.custom_vjp
    def loss(fac, x, w, y):
        return lora_attention_loss(fac, x, w, y, beta=approx.beta, alpha=approx.alpha)

    def fwd(fac, x, w, y):
        return loss(fac, x, w, y), (fac, x, w, y)

    def bwd(res, g):
        fac, x, w, y = res
        grads = approx_lora_grads(fac, x, w, y, approx)
        d_fac = {t: (g * da, g * db) for t, (da, db) in grads.items()}
        return d_fac, jnp.zeros_like(x), jax.tree.map(jnp.zeros_like, w), jnp.zeros_like(y)

    loss.defvjp(fwd, bwd)
    return loss(factors, x_LD, weights, y_LV)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _exact_grads(factors, x_LD, weights, y_LV, beta, alpha):
    return jax.grad(lora_attention_loss)(factors, x_LD, weights, y_LV, beta=beta, alpha=alpha)


def gradient_error(factors, x_LD, weights, y_LV, approx: ChainedApprox) -> dict:
    """Relative Frobenius error ‖g̃ − g‖ / ‖g‖ of the approximate gradient of every factor
    (keys "q.a", "q.b", ...) and of all of them together ("total"), g the exact gradient."""
    exact = _exact_grads(factors, x_LD, weights, y_LV, approx.beta, approx.alpha)
    got = approx_lora_grads(factors, x_LD, weights, y_LV, approx)
    out, num, den = {}, 0.0, 0.0
    for t in factors:
        for j, name in enumerate("ab"):
            e2 = jnp.sum(jnp.square(got[t][j] - exact[t][j]))
            n2 = jnp.sum(jnp.square(exact[t][j]))
            out[f"{t}.{name}"] = float(jnp.sqrt(e2 / n2))
            num, den = num + e2, den + n2
    out["total"] = float(jnp.sqrt(num / den))
    return out
