"""The three forms of causal linear attention behind ``jaxattn.ops.linear_attention``.

All take normalised operands (see ``linear_attention``): q_BTKGH (query heads grouped by
their kv head), k_BTKH, v_BTKV, a per-step log gate g_BTKX (X = H for per-key-dim gates, 1 for
scalar ones; 0 = no decay), a delta-rule write strength beta_BTK, and a state S_BKHV, and
compute in float32 whatever the input dtype. With G_t = Σ_{s≤t} g_s (per key dim):

  plain:  S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ
  delta:  S'_t = exp(g_t) S_{t-1};  u_t = β_t (v_t - S'_tᵀ k_t);  S_t = S'_t + k_t u_tᵀ
  output: o_t = scale · S_tᵀ q_t

* ``naive_form``: the O(T²) masked form, one block of all T steps:
  o = (scale·(Q Kᵀ ⊙ D ⊙ causal)) U with D_ts = exp(G_t - G_s), U = V (plain) or, for the
  delta rule, the solution of
  (I + strict_tril(diag(β) (K Kᵀ ⊙ D))) U = diag(β) V (the UT-transform form of Yang et al.
  2024, "Parallelizing linear transformers with the delta rule over sequence length", with
  gates), the inverse taken by block doubling (``_unit_lower_inverse``).
* ``chunked_form``: chunks of C steps: the naive form inside a chunk plus the state carried
  from the chunks before it by ``lax.scan``; its custom VJP saves only the state entering
  each chunk and recomputes each chunk in a reverse scan.
* ``recurrent_form``: the recurrence above, one step at a time (decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["naive_form", "chunked_form", "recurrent_form"]

_F32 = jnp.float32


def _decays(gam_BKIX, gam_BKJX, mask_IJ):
    """exp(G_i - G_j) where ``mask_IJ``, else 0 (the exponent is masked first: exp(+big) of the
    masked half would overflow and poison gradients). [B, K, I, J, X]."""
    diff = gam_BKIX[:, :, :, None, :] - gam_BKJX[:, :, None, :, :]
    return jnp.exp(jnp.where(mask_IJ[None, None, :, :, None], diff, -jnp.inf))


def _unit_lower_inverse(a_BKCC):
    """(I + A)⁻¹ of unit lower-triangular matrices [..., C, C], by block doubling: with the
    inverses D11, D22 of two diagonal blocks of size m, the block of size 2m has inverse
    [[D11, 0], [-D22 A21 D11, D22]]. log2(C) levels of batched matmuls (as stable as forward
    substitution, which XLA's CPU triangular solve runs row by row, and much faster).
    C is padded to a power of two with identity rows."""
    *lead, c, _ = a_BKCC.shape
    p = 1 << max(c - 1, 0).bit_length()
    if p != c:
        a_BKCC = jnp.pad(a_BKCC, [(0, 0)] * len(lead) + [(0, p - c), (0, p - c)])
        a_BKCC = a_BKCC + jnp.diag((jnp.arange(p) >= c).astype(a_BKCC.dtype))
    d = jnp.ones((*lead, p, 1, 1), a_BKCC.dtype)  # inverses of the 1×1 diagonal blocks
    m = 1
    while m < p:
        n2 = p // (2 * m)
        x = a_BKCC.reshape(*lead, n2, 2, m, n2, 2, m)[..., :, 1, :, :, 0, :]
        a21 = jnp.moveaxis(jnp.diagonal(x, axis1=-4, axis2=-2), -1, -3)  # [..., n2, m, m]
        d11, d22 = d[..., 0::2, :, :], d[..., 1::2, :, :]
        d21 = -(d22 @ a21 @ d11)
        top = jnp.concatenate([d11, jnp.zeros_like(d11)], axis=-1)
        d = jnp.concatenate([top, jnp.concatenate([d21, d22], axis=-1)], axis=-2)
        m *= 2
    return d[..., 0, :c, :c]


def _block(S_BKHV, q_BKGCH, k_BKCH, v_BKCV, g_BKCX, beta_BKC, *, scale, delta):
    """One block of C steps from state S: (o_BKGCV, S_new) — the naive form within the block
    plus the contribution of S. float32 in, float32 out."""
    c = k_BKCH.shape[2]
    gam_BKCX = jnp.cumsum(g_BKCX, axis=2)
    causal_CC = jnp.tril(jnp.ones((c, c), bool))
    e_BKCCX = _decays(gam_BKCX, gam_BKCX, causal_CC)
    if g_BKCX.shape[-1] == 1:  # scalar gates: decay the scores
        qk_BKGCC = jnp.einsum("bkgih,bkjh->bkgij", q_BKGCH, k_BKCH) * e_BKCCX[:, :, None, ..., 0]
    else:  # per-key-dim gates: the decay sits inside the dot product
        qk_BKGCC = jnp.einsum("bkgih,bkjh,bkijh->bkgij", q_BKGCH, k_BKCH, e_BKCCX)
    if delta:  # solve (I + strict_tril(β KKᵀ ⊙ D)) U = β (V - exp(G) K S)
        kk_BKCC = jnp.einsum("bkih,bkjh->bkij", k_BKCH, k_BKCH) * e_BKCCX[..., 0]
        a_BKCC = jnp.eye(c, dtype=_F32) + beta_BKC[..., None] * jnp.tril(kk_BKCC, -1)
        pred_BKCV = jnp.einsum("bkch,bkhv->bkcv", k_BKCH * jnp.exp(gam_BKCX), S_BKHV)
        rhs_BKCV = beta_BKC[..., None] * (v_BKCV - pred_BKCV)
        u_BKCV = _unit_lower_inverse(a_BKCC) @ rhs_BKCV
    else:
        u_BKCV = v_BKCV
    q_decayed = q_BKGCH * jnp.exp(gam_BKCX)[:, :, None]
    o_BKGCV = scale * (
        jnp.einsum("bkgch,bkhv->bkgcv", q_decayed, S_BKHV)
        + jnp.einsum("bkgij,bkjv->bkgiv", qk_BKGCC, u_BKCV)
    )
    last_BK1X = gam_BKCX[:, :, -1:]
    k_to_end = k_BKCH * jnp.exp(last_BK1X - gam_BKCX)
    S_new = jnp.exp(last_BK1X)[:, :, 0, :, None] * S_BKHV
    S_new = S_new + jnp.einsum("bkch,bkcv->bkhv", k_to_end, u_BKCV)
    return o_BKGCV, S_new


def _to_f32(*xs):
    return [x.astype(_F32) for x in xs]


def naive_form(q_BTKGH, k_BTKH, v_BTKV, g_BTKX, beta_BTK, S_BKHV, *, scale, delta):
    """The whole sequence as one block (O(T²) scores, a T×T solve for the delta rule).

    Returns:
      (o_BTKGV float32, final state S_BKHV float32).
    """
    q, k, v, g, beta, S = _to_f32(q_BTKGH, k_BTKH, v_BTKV, g_BTKX, beta_BTK, S_BKHV)
    o, S = _block(
        S,
        jnp.einsum("btkgh->bkgth", q),
        jnp.einsum("btkh->bkth", k),
        jnp.einsum("btkv->bktv", v),
        jnp.einsum("btkx->bktx", g),
        jnp.einsum("btk->bkt", beta),
        scale=scale,
        delta=delta,
    )
    return jnp.einsum("bkgtv->btkgv", o), S


def recurrent_form(q_BTKGH, k_BTKH, v_BTKV, g_BTKX, beta_BTK, S_BKHV, *, scale, delta):
    """The recurrence, one step per token (``lax.scan`` over T); T = 1 is a decode step.

    Returns:
      (o_BTKGV float32, final state S_BKHV float32).
    """

    def step(S, xs):
        q_BKGH, k_BKH, v_BKV, g_BKX, beta_BK = _to_f32(*xs)
        S = jnp.exp(g_BKX)[..., None] * S
        if delta:
            pred_BKV = jnp.einsum("bkh,bkhv->bkv", k_BKH, S)
            u_BKV = beta_BK[..., None] * (v_BKV - pred_BKV)
        else:
            u_BKV = v_BKV
        S = S + k_BKH[..., None] * u_BKV[..., None, :]
        return S, scale * jnp.einsum("bkgh,bkhv->bkgv", q_BKGH, S)

    xs = [jnp.moveaxis(x, 1, 0) for x in (q_BTKGH, k_BTKH, v_BTKV, g_BTKX, beta_BTK)]
    S, o_TBKGV = jax.lax.scan(step, S_BKHV.astype(_F32), xs)
    return jnp.moveaxis(o_TBKGV, 0, 1), S


# -- chunked ------------------------------------------------------------------------------------


def _chunks(x_BT_, c: int):
    """[B, T, ...] (T a multiple of c) -> chunk-major [T/c, B, ..., c, (X)] for ``_block``:
    the chunk's time axis last for beta [B, T, K], before the feature axis otherwise."""
    b, t = x_BT_.shape[:2]
    x = x_BT_.reshape(b, t // c, c, *x_BT_.shape[2:])
    x = jnp.moveaxis(x, 1, 0)  # [NC, B, c, ...]
    return jnp.moveaxis(x, 2, -1 if x_BT_.ndim == 3 else -2)


def _unchunk(o_NBKGCV):
    nc, b, k, g, c, v = o_NBKGCV.shape
    return jnp.einsum("nbkgcv->bnckgv", o_NBKGCV).reshape(b, nc * c, k, g, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _scan_chunks(S_BKHV, q_N, k_N, v_N, g_N, beta_N, scale, delta):
    (o_N, S), _ = _scan_fwd(S_BKHV, q_N, k_N, v_N, g_N, beta_N, scale, delta)
    return o_N, S


def _scan_fwd(S_BKHV, q_N, k_N, v_N, g_N, beta_N, scale, delta):
    block = functools.partial(_block, scale=scale, delta=delta)

    def step(S, xs):
        o, S_new = block(S, *_to_f32(*xs))
        return S_new, (o, S)

    S, (o_N, states_in_N) = jax.lax.scan(step, S_BKHV, (q_N, k_N, v_N, g_N, beta_N))
    # residuals: the inputs and the state entering each chunk; nothing per step
    return (o_N, S), (states_in_N, q_N, k_N, v_N, g_N, beta_N)


def _scan_bwd(scale, delta, res, cts):
    states_in_N, *inputs = res
    do_N, dS_end = cts
    block = functools.partial(_block, scale=scale, delta=delta)

    def step(dS, xs):
        S_in, do, *chunk = xs
        dtypes = [x.dtype for x in chunk]
        _, vjp = jax.vjp(block, S_in, *_to_f32(*chunk))  # recompute this chunk
        dS_in, *grads = vjp((do, dS))
        return dS_in, [gr.astype(dt) for gr, dt in zip(grads, dtypes, strict=True)]

    dS0, grads = jax.lax.scan(step, dS_end, (states_in_N, do_N, *inputs), reverse=True)
    return (dS0, *grads)


_scan_chunks.defvjp(_scan_fwd, _scan_bwd)


def chunked_form(q_BTKGH, k_BTKH, v_BTKV, g_BTKX, beta_BTK, S_BKHV, *, scale, delta, chunk_size):
    """Chunks of ``chunk_size`` steps, the state carried between them (custom VJP).

    T need not be a multiple of the chunk: the tail is padded with steps that change nothing
    (k = v = q = 0, log gate 0, β = 0) and cut off the output.

    Returns:
      (o_BTKGV float32, final state S_BKHV float32).
    """
    t = k_BTKH.shape[1]
    c = min(chunk_size, t)
    pad = -t % c
    xs = (q_BTKGH, k_BTKH, v_BTKV, g_BTKX, beta_BTK)
    if pad:
        xs = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs]
    o_N, S = _scan_chunks(S_BKHV.astype(_F32), *[_chunks(x, c) for x in xs], scale, delta)
    return _unchunk(o_N)[:, :t], S
