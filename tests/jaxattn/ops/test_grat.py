"""GRAT (jaxattn.ops.grat): group-shared block-sparse attention equals dense attention with
the equivalent token-level mask (1-D surrounding, 2-D surrounding and criss-cross, fwd+bwd),
a region covering every group is full attention, bad input names the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn import dot_product_attention
from jaxattn.ops import grat

CASES = {
    "1d_surrounding": dict(group=6, radius=1),
    "2d_surrounding": dict(grid_hw=(6, 8), group_hw=(2, 2), radius=1),
    "2d_criss_cross": dict(grid_hw=(6, 8), group_hw=(3, 2), pattern="criss_cross"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_dense_equivalent_mask_fwd_bwd(name):
    kw = CASES[name]
    q, k, v, do = normal(0, *((2, 48, n, 8) for n in (4, 2, 2, 4)))
    mask = jnp.asarray(grat.grat_dense_mask(48, **kw))

    def both(q, k, v, do, mask):  # the op and the masked reference, in one compiled call
        vg = lambda f: jax.value_and_grad(  # noqa: E731
            lambda *a: jnp.sum(f(*a) * do), argnums=(0, 1, 2)
        )(q, k, v)
        return (
            vg(lambda q, k, v: grat.grat_attention(q, k, v, **kw)),
            vg(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)),
        )

    got, want = fast_jit(both)(q, k, v, do, mask)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_covering_region_is_full_attention_and_bad_input():
    q, k, v = normal(1, *[(1, 48, 2, 8)] * 3)
    got = grat.grat_attention(q, k, v, grid_hw=(6, 8), group_hw=(2, 2), radius=4)
    np.testing.assert_allclose(got, dot_product_attention(q, k, v), atol=2e-5, rtol=2e-5)
    assert grat.grat_layout((2, 3), pattern="criss_cross").sum() == 6 * 4  # row + column
    with pytest.raises(ValueError, match="pattern must be one of"):
        grat.grat_layout((2, 2), pattern="ring")
    with pytest.raises(ValueError, match="multiple of group=5"):
        grat.grat_attention(q, k, v, group=5)
