"""BiFormer's Bi-Level Routing Attention (Zhu et al. 2023, arXiv 2303.08810) on block visits.

Tokens are split into regions (1-D: contiguous runs of ``region`` tokens; 2-D: a token grid
[Hg, Wg] cut into ``region_hw`` tiles). Region-level queries and keys are the means of their
tokens' queries and keys over all heads (the routing is shared by the heads, as in the paper);
A = Q_r · K_r^T gives each query region its top-k key regions; every token then attends to the
tokens of its region's routed regions (no causal mask: vision).

:func:`bilevel_routing_attention` runs the token attention as ``dot_product_attention`` with
``BlockVisits`` (one list per query region, block = region; 2-D grids are first permuted to
region-major order, so regions are contiguous, and permuted back). :func:`biformer_reference`
gathers each region's routed tokens and runs dense softmaxes over them (the paper's
gather + dense matmul form).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import BlockVisits
from jaxattn.ops.attention import dot_product_attention

__all__ = ["region_order", "route", "bilevel_routing_attention", "biformer_reference"]


def region_order(grid_hw: tuple[int, int], region_hw: tuple[int, int]) -> np.ndarray:
    """Permutation of row-major grid tokens into region-major order (tiles row-major, tokens
    row-major inside each tile); ``x[:, order]`` makes every region contiguous.

    Raises:
      ValueError: region_hw does not tile grid_hw.
    """
    (gh, gw), (rh, rw) = grid_hw, region_hw
    if gh % rh or gw % rw:
        raise ValueError(f"region_hw={region_hw} must tile grid_hw={grid_hw}")
    idx = np.arange(gh * gw).reshape(gh // rh, rh, gw // rw, rw)
    return idx.transpose(0, 2, 1, 3).reshape(-1)


def route(q_BTNH, k_BTKH, *, region: int, top_k: int):
    """Top-k key regions per query region, from mean-pooled region queries and keys (over
    tokens and heads): int32 [B, nr, k], regions in increasing affinity order not guaranteed.

    Raises:
      ValueError: T not a multiple of region, or top_k outside [1, regions].
    """
    B, T, N, H = q_BTNH.shape
    if T % region:
        raise ValueError(f"sequence length T={T} must be a multiple of region={region}")
    nr = T // region
    if not 1 <= top_k <= nr:
        raise ValueError(f"top_k={top_k} must be in [1, regions={nr}]")
    qr = q_BTNH.astype(jnp.float32).reshape(B, nr, region, -1).mean(2)  # [B, nr, N·H]
    kr = k_BTKH.astype(jnp.float32)
    kr = jnp.repeat(kr, N // kr.shape[2], axis=2).reshape(B, nr, region, -1).mean(2)
    affinity = jnp.einsum("bic,bjc->bij", qr, kr)
    return jax.lax.top_k(jax.lax.stop_gradient(affinity), top_k)[1].astype(jnp.int32)


def bilevel_routing_attention(
    q_BTNH,
    k_BTKH,
    v_BTKV,
    *,
    region: int,
    top_k: int,
    grid_hw=None,
    region_hw=None,
    implementation="auto",
):
    """Bi-level routing attention (module docstring).

    Args:
      q_BTNH, k_BTKH, v_BTKV: tokens' queries / keys / values (T = Hg·Wg for a grid, row-major).
      region: tokens per region (1-D); for a grid, region = region_hw[0] · region_hw[1].
      top_k: routed key regions per query region.
      grid_hw, region_hw: the token grid and the region tile (2-D), or None (1-D).

    Returns:
      o_BTNV in the input token order.
    """
    order = None
    if grid_hw is not None:
        order = region_order(grid_hw, region_hw)
        if region != region_hw[0] * region_hw[1]:
            raise ValueError(f"region={region} must be region_hw[0]·region_hw[1]={region_hw}")
        q_BTNH, k_BTKH, v_BTKV = (x[:, order] for x in (q_BTNH, k_BTKH, v_BTKV))
    idx = route(q_BTNH, k_BTKH, region=region, top_k=top_k)
    B, nr, _ = idx.shape
    visits = BlockVisits(
        indices=idx[:, None],
        counts=jnp.full((B, 1, nr), top_k, jnp.int32),
        block_q=region,
        block_kv=region,
    )
    o = dot_product_attention(
        q_BTNH, k_BTKH, v_BTKV, block_visits=visits, implementation=implementation
    )
    return o if order is None else o[:, np.argsort(order)]


def biformer_reference(q_BTNH, k_BTKH, v_BTKV, *, region, top_k, grid_hw=None, region_hw=None):
    """Gather + dense form: each query region gathers the k·region tokens of its routed
    regions and attends to them with one dense softmax per head."""
    order = None
    if grid_hw is not None:
        order = region_order(grid_hw, region_hw)
        q_BTNH, k_BTKH, v_BTKV = (x[:, order] for x in (q_BTNH, k_BTKH, v_BTKV))
    idx = route(q_BTNH, k_BTKH, region=region, top_k=top_k)  # [B, nr, k]
    B, T, N, H = q_BTNH.shape
    K, nr = k_BTKH.shape[2], T // region
    G = N // K
    regions = lambda x: x.reshape(B, nr, region, *x.shape[2:])  # noqa: E731
    bi = jnp.arange(B)[:, None, None]
    kg = regions(k_BTKH)[bi, idx].reshape(B, nr, top_k * region, K, H)  # gathered tokens
    vg = regions(v_BTKV)[bi, idx].reshape(B, nr, top_k * region, K, -1)
    qr = regions(q_BTNH).reshape(B, nr, region, K, G, H)
    s = jnp.einsum("brtkgh,brskh->brkgts", qr.astype(jnp.float32), kg.astype(jnp.float32))
    p = jax.nn.softmax(s / np.sqrt(H), axis=-1)
    o = jnp.einsum("brkgts,brskv->brtkgv", p, vg.astype(jnp.float32)).reshape(B, T, N, -1)
    o = o.astype(q_BTNH.dtype)
    return o if order is None else o[:, np.argsort(order)]
