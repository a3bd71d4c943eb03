"""GRAT (Grouping First, Attending Smartly; PAPERS.md §3): group-shared structured attention.

Training-free attention for diffusion transformers: contiguous tokens are grouped (1-D: runs
of ``group`` tokens; 2-D: ``group_hw`` tiles of a token grid, tokens reordered tile-major so a
tile is contiguous) and all queries of a group share one set of key groups, a structured
region of the group grid:

* ``"surrounding"``: key groups within ``radius`` of the query group (Chebyshev distance on
  the group grid; 1-D: |i - j| <= radius);
* ``"criss_cross"`` (2-D): key groups in the query group's row or column of groups.

The region is a static ``BlockSparse`` layout (one block per group), so the op (and the Pallas
kernels) skip every other block. :func:`grat_layout` is the layout; :func:`grat_dense_mask`
the equivalent token-level mask in the input order (the faithful test's reference).
"""

from __future__ import annotations

import numpy as np

from jaxattn.masks import BlockSparse
from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.biformer import region_order

__all__ = ["grat_layout", "grat_dense_mask", "grat_attention"]

PATTERNS = ("surrounding", "criss_cross")


def _group_coords(num_groups_hw):
    gh, gw = num_groups_hw
    return np.divmod(np.arange(gh * gw), gw)


def grat_layout(num_groups_hw, *, pattern="surrounding", radius=1) -> np.ndarray:
    """bool [ng, ng]: may query group i attend to key group j (groups in row-major order of
    the group grid; 1-D: num_groups_hw = (1, ng)).

    Raises:
      ValueError: an unknown pattern, or a negative radius.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    a, b = _group_coords(num_groups_hw)
    da, db = np.abs(a[:, None] - a[None]), np.abs(b[:, None] - b[None])
    if pattern == "surrounding":
        return (da <= radius) & (db <= radius)
    return (da == 0) | (db == 0)


def _order(T, group, grid_hw, group_hw):
    if grid_hw is None:
        if T % group:
            raise ValueError(f"T={T} must be a multiple of group={group}")
        return None, (1, T // group), group
    order = region_order(grid_hw, group_hw)
    return order, (grid_hw[0] // group_hw[0], grid_hw[1] // group_hw[1]), group_hw[0] * group_hw[1]


def grat_dense_mask(
    T, *, group=None, grid_hw=None, group_hw=None, pattern="surrounding", radius=1
) -> np.ndarray:
    """bool [T, T] in the input token order, built per token from its group's grid cell."""
    if grid_hw is None:
        gid = np.arange(T) // group
        ng_hw = (1, T // group)
    else:
        rows, cols = np.divmod(np.arange(T), grid_hw[1])
        ng_hw = (grid_hw[0] // group_hw[0], grid_hw[1] // group_hw[1])
        gid = (rows // group_hw[0]) * ng_hw[1] + cols // group_hw[1]
    layout = grat_layout(ng_hw, pattern=pattern, radius=radius)
    return layout[gid[:, None], gid[None]]


def grat_attention(
    q_BTNH,
    k_BTKH,
    v_BTKV,
    *,
    group=None,
    grid_hw=None,
    group_hw=None,
    pattern="surrounding",
    radius=1,
    implementation="auto",
):
    """Group-shared structured attention (module docstring): o_BTNV in the input order."""
    T = q_BTNH.shape[1]
    order, ng_hw, size = _order(T, group, grid_hw, group_hw)
    layout = grat_layout(ng_hw, pattern=pattern, radius=radius)
    spec = BlockSparse(layout=layout, block_q=size, block_kv=size)
    if order is not None:
        q_BTNH, k_BTKH, v_BTKV = (x[:, order] for x in (q_BTNH, k_BTKH, v_BTKV))
    o = dot_product_attention(q_BTNH, k_BTKH, v_BTKV, mask=spec, implementation=implementation)
    return o if order is None else o[:, np.argsort(order)]
