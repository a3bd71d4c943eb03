"""In-context linear regression testbed (In-Context Linear Regression Demystified: Training
Dynamics and Mechanistic Interpretability of Multi-Head Softmax Attention, 2025).

Task: ``w ~ N(0, I_d)``, ``x_i ~ N(0, I_d)``, ``y_i = w·x_i`` for n context tokens
``z_i = (x_i, y_i)`` and a query ``z_q = (x_q, 0)``; predict ``y_q``. Model: one layer of
multi-head softmax attention (``jaxattn.ops.attention.dot_product_attention``), the query
attending to the n context tokens, read at the last entry:

    ŷ = sum_h sum_i softmax_i(z_q W_Q[h] · z_i W_K[h]) · (z_i · u_h)

where ``u_h`` [d + 1] is the last column of head h's OV product (the only one the readout
sees). The reported patterns: each head's KQ product ``W_Q[h] W_K[h]^T`` restricted to the x
block is ~ ``ω_h I`` (diagonal, homogeneous); ``u_h`` is last-entry-only (its x part ~ 0) and,
with two heads, ``ω`` of opposite signs and y entries of opposite signs ("zero-sum"), which
approximates a debiased gradient-descent step; multi-head beats single-head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.ops.attention import dot_product_attention

__all__ = ["sample", "init", "predict", "train", "patterns"]


def sample(key, batch: int, n: int, d: int):
    """(z_BnD context tokens [B, n, d + 1], zq_BD [B, d + 1], y_B targets)."""
    kw, kx, kq = jax.random.split(key, 3)
    w = jax.random.normal(kw, (batch, d))
    x = jax.random.normal(kx, (batch, n, d))
    xq = jax.random.normal(kq, (batch, d))
    z = jnp.concatenate([x, jnp.einsum("bnd,bd->bn", x, w)[..., None]], -1)
    zq = jnp.concatenate([xq, jnp.zeros((batch, 1))], -1)
    return z, zq, jnp.einsum("bd,bd->b", xq, w)


def init(key, heads: int, d: int, scale: float = 0.1) -> dict:
    """Parameters: ``q``, ``k`` [heads, d + 1, d + 1], ``u`` [heads, d + 1] (small random)."""
    kq, kk, ku = jax.random.split(key, 3)
    D = d + 1
    return {
        "q": scale * jax.random.normal(kq, (heads, D, D)),
        "k": scale * jax.random.normal(kk, (heads, D, D)),
        "u": scale * jax.random.normal(ku, (heads, D)),
    }


def predict(params, z_BnD, zq_BD):
    """ŷ [B]: the query row of the attention op over the context, one value dim per head."""
    D = params["u"].shape[-1]
    if z_BnD.ndim != 3 or z_BnD.shape[-1] != D or zq_BD.shape != (z_BnD.shape[0], D):
        raise ValueError(f"z_BnD [B, n, {D}] and zq_BD [B, {D}] needed, got {z_BnD.shape}, "
                         f"{zq_BD.shape}")  # fmt: skip
    q_B1NH = jnp.einsum("bd,ndh->bnh", zq_BD, params["q"])[:, None]
    k_BnNH = jnp.einsum("bsd,ndh->bsnh", z_BnD, params["k"])
    v_BnN1 = jnp.einsum("bsd,nd->bsn", z_BnD, params["u"])[..., None]
    o_B1N1 = dot_product_attention(q_B1NH, k_BnNH, v_BnN1, scale=1.0, implementation="xla")
    return jnp.sum(o_B1N1, axis=(1, 2, 3))


def train(key, *, heads: int, d: int = 4, n: int = 16, steps: int = 1500, batch: int = 256,
          learning_rate: float = 1e-2):  # fmt: skip
    """Adam on fresh tasks each step; returns (params, held-out MSE)."""
    import optax

    k0, kdata, kval = jax.random.split(key, 3)
    params = init(k0, heads, d)
    opt = optax.adam(learning_rate)

    def loss(p, k):
        z, zq, y = sample(k, batch, n, d)
        return jnp.mean((predict(p, z, zq) - y) ** 2)

    @jax.jit
    def run(params):
        def step(carry, k):
            p, s = carry
            g = jax.grad(loss)(p, k)
            u, s = opt.update(g, s)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(kdata, steps))
        return p

    params = run(params)
    z, zq, y = sample(kval, 4096, n, d)
    return params, float(jnp.mean((predict(params, z, zq) - y) ** 2))


def patterns(params, d: int) -> dict:
    """The reported quantities per head: ``omega`` (mean diagonal of the KQ x block),
    ``offdiag`` and ``diag_spread`` (max |off-diagonal| and std of the diagonal, relative to
    |omega|), ``u_x`` (max |x part of u_h| relative to |u_h[y]|) and ``u_y``."""
    kq = jnp.einsum("nij,nkj->nik", params["q"], params["k"])[:, :d, :d]
    diag = jnp.diagonal(kq, axis1=1, axis2=2)
    omega = jnp.mean(diag, -1)
    off = kq - jax.vmap(jnp.diag)(diag)
    u = params["u"]
    return {
        "omega": omega,
        "offdiag": jnp.max(jnp.abs(off), (1, 2)) / jnp.abs(omega),
        "diag_spread": jnp.std(diag, -1) / jnp.abs(omega),
        "u_x": jnp.max(jnp.abs(u[:, :d]), -1) / jnp.abs(u[:, d]),
        "u_y": u[:, d],
    }
