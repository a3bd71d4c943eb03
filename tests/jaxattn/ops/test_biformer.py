"""BiFormer bi-level routing attention (jaxattn.ops.biformer): the block-visit form equals the
gather + dense reference (1-D and 2-D grids, GQA, gradients); k = all regions is full
attention; the routing picks the highest-affinity regions; bad input names the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn import dot_product_attention
from jaxattn.ops import biformer

TOL = dict(atol=2e-5, rtol=2e-5)


def _qkv(seed, B=2, T=48, K=2, G=2, H=8):
    return tuple(normal(seed, (B, T, K * G, H), (B, T, K, H), (B, T, K, H), (B, T, K * G, H)))


def _vg_pair(fast, ref, q, k, v, do):
    """Value and (dq, dk, dv) of both functions, in one compiled call."""

    def both(q, k, v, do):
        vg = lambda f: jax.value_and_grad(lambda *a: jnp.sum(f(*a) * do), argnums=(0, 1, 2))  # noqa: E731
        return vg(fast)(q, k, v), vg(ref)(q, k, v)

    return fast_jit(both)(q, k, v, do)


@pytest.mark.parametrize(
    "kw",
    [dict(region=8, top_k=2), dict(region=4, top_k=3, grid_hw=(6, 8), region_hw=(2, 2))],
    ids=["1d", "2d"],
)
def test_block_visits_equal_gather_reference(kw):
    q, k, v, do = _qkv(0)
    got, want = _vg_pair(
        lambda q, k, v: biformer.bilevel_routing_attention(q, k, v, **kw),
        lambda q, k, v: biformer.biformer_reference(q, k, v, **kw),
        q,
        k,
        v,
        do,
    )
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for name, g, w in zip(("dq", "dk", "dv"), got[1], want[1]):
        np.testing.assert_allclose(g, w, err_msg=name, **TOL)


@pytest.mark.parametrize("grid", [None, ((6, 8), (3, 2))], ids=["1d", "2d"])
def test_all_regions_is_full_attention(grid):
    q, k, v, _ = _qkv(1)
    kw = (
        dict(region=6, top_k=8)
        if grid is None
        else dict(region=6, top_k=8, grid_hw=grid[0], region_hw=grid[1])
    )
    both = lambda q, k, v: (  # noqa: E731  (one compile for both)
        biformer.bilevel_routing_attention(q, k, v, **kw),
        dot_product_attention(q, k, v),
    )
    got, want = fast_jit(both)(q, k, v)
    np.testing.assert_allclose(got, want, **TOL)


def test_routing_takes_highest_affinity_regions_and_bad_input():
    q, k, _, _ = _qkv(2, B=1, T=16, K=1, G=1, H=4)
    idx = np.asarray(biformer.route(q, k, region=4, top_k=2))[0]
    qr, kr = q[0, :, 0].reshape(4, 4, 4).mean(1), k[0, :, 0].reshape(4, 4, 4).mean(1)
    best = np.argsort(-np.asarray(qr @ kr.T), axis=1)[:, :2]
    assert [set(r) for r in idx] == [set(r) for r in best]
    order = biformer.region_order((4, 4), (2, 2))
    assert order[:4].tolist() == [0, 1, 4, 5]  # the first 2x2 tile is contiguous
    with pytest.raises(ValueError, match="top_k=5 must be in"):
        biformer.route(q, k, region=4, top_k=5)
    with pytest.raises(ValueError, match="multiple of region=5"):
        biformer.route(q, k, region=5, top_k=1)
    with pytest.raises(ValueError, match="must tile grid_hw"):
        biformer.region_order((4, 4), (3, 2))
