"""HiLo attention (LITv2, Pan et al. 2022, arXiv 2205.13213) on the attention op.

A token grid [Hg, Wg] (tokens row-major) is cut into s x s windows. The first ``n_hi`` heads
("Hi", high frequencies) attend within their window; the other heads ("Lo") let every query
attend to the s x s average-pooled keys and values of every window. Outputs are concatenated
over heads. With q, k, v given per head, pooling k and v equals LITv2's pooling of x before the
k/v projection (a linear map commutes with the mean).

Hi heads run ``dot_product_attention`` on region-major tokens with a block-diagonal static
``BlockSparse`` layout (off-window blocks are skipped); Lo heads run it over the nr pooled keys.
:func:`hilo_reference` gathers each window explicitly and pools with reshapes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxattn.masks import BlockSparse
from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.biformer import region_order

__all__ = ["hilo_attention", "hilo_reference"]


def _check(q, k, grid_hw, window, n_hi):
    B, T, N, H = q.shape
    if k.shape[2] != N:
        raise ValueError(f"HiLo needs one kv head per query head, got N={N}, K={k.shape[2]}")
    if T != grid_hw[0] * grid_hw[1]:
        raise ValueError(f"T={T} must equal grid_hw[0]·grid_hw[1] for grid_hw={grid_hw}")
    if not 0 <= n_hi <= N:
        raise ValueError(f"n_hi={n_hi} must be in [0, heads={N}]")
    return region_order(grid_hw, (window, window))


def _pool(x_BTKH, order, w2):
    B, T = x_BTKH.shape[:2]
    return x_BTKH[:, order].reshape(B, T // w2, w2, *x_BTKH.shape[2:]).mean(2)


def hilo_attention(
    q_BTNH, k_BTNH, v_BTNV, *, grid_hw, window: int, n_hi: int, implementation="auto"
):
    """HiLo over a token grid (module docstring): o_BTNV, Hi heads first.

    Raises:
      ValueError: K != N, T != Hg·Wg, windows that do not tile the grid, n_hi out of range.
    """
    order = _check(q_BTNH, k_BTNH, grid_hw, window, n_hi)
    w2, T = window * window, q_BTNH.shape[1]
    outs = []
    if n_hi:
        nr = T // w2
        diag = BlockSparse(layout=np.eye(nr, dtype=bool), block_q=w2, block_kv=w2)
        qh, kh, vh = (x[:, order, :n_hi] for x in (q_BTNH, k_BTNH, v_BTNV))
        o = dot_product_attention(qh, kh, vh, mask=diag, implementation=implementation)
        outs.append(o[:, np.argsort(order)])
    if n_hi < q_BTNH.shape[2]:
        kp, vp = (_pool(x[:, :, n_hi:], order, w2) for x in (k_BTNH, v_BTNV))
        outs.append(
            dot_product_attention(q_BTNH[:, :, n_hi:], kp, vp, implementation=implementation)
        )
    return jnp.concatenate(outs, axis=2)


def hilo_reference(q_BTNH, k_BTNH, v_BTNV, *, grid_hw, window, n_hi):
    """Explicit windows and pooling: Hi heads softmax over their window's w² tokens (gathered
    from the grid by coordinates), Lo heads over the per-window means."""
    _check(q_BTNH, k_BTNH, grid_hw, window, n_hi)
    B, T, N, H = q_BTNH.shape
    gh, gw = grid_hw
    rows, cols = np.divmod(np.arange(T), gw)
    win = (rows // window) * (gw // window) + cols // window  # window id of each token
    members = np.stack([np.flatnonzero(win == r) for r in range(win.max() + 1)])  # [nr, w²]
    scale = 1.0 / np.sqrt(H)
    q, k, v = (x.astype(jnp.float32) for x in (q_BTNH, k_BTNH, v_BTNV))
    kw, vw = k[:, members[win]], v[:, members[win]]  # [B, T, w², N, .]: each token's window
    s = jnp.einsum("btnh,btsnh->btns", q, kw) * scale
    hi = jnp.einsum(
        "btns,btsnv->btnv",
        jnp.exp(s - s.max(-1, keepdims=True))
        / jnp.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True),
        vw,
    )
    kp, vp = k[:, members].mean(2), v[:, members].mean(2)  # [B, nr, N, .]
    s = jnp.einsum("btnh,brnh->btnr", q, kp) * scale
    p = jnp.exp(s - s.max(-1, keepdims=True))
    lo = jnp.einsum("btnr,brnv->btnv", p / p.sum(-1, keepdims=True), vp)
    return jnp.concatenate([hi[:, :, :n_hi], lo[:, :, n_hi:]], axis=2).astype(q_BTNH.dtype)
