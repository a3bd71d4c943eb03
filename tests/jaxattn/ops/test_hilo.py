"""HiLo (jaxattn.ops.hilo): the Hi heads equal windowed attention, the Lo heads full attention
over average-pooled kv, the head split is respected, and the whole equals the explicit
reference, forward and backward; bad input names the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn.ops import hilo

TOL = dict(atol=2e-5, rtol=2e-5)
GRID, WIN = (4, 6), 2


def _qkv(seed, N=4, H=8):
    T = GRID[0] * GRID[1]
    return normal(seed, *[(2, T, N, H)] * 4)


@pytest.mark.parametrize(
    "n_hi",
    # 0: all Lo heads, 4: all Hi, 2: the split; n_hi=1 (one more split) is a repeat of 2
    [0, pytest.param(1, marks=pytest.mark.slow), 2, 4],
)
def test_equals_explicit_windows_and_pooling_fwd_bwd(n_hi):
    q, k, v, do = _qkv(n_hi)
    kw = dict(grid_hw=GRID, window=WIN, n_hi=n_hi)

    def both(q, k, v, do):  # the op and the reference, in one compiled call
        vg = lambda f: jax.value_and_grad(  # noqa: E731
            lambda *a: jnp.sum(f(*a, **kw) * do), argnums=(0, 1, 2)
        )(q, k, v)
        return vg(hilo.hilo_attention), vg(hilo.hilo_reference)

    got, want = fast_jit(both)(q, k, v, do)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for name, g, w in zip(("dq", "dk", "dv"), got[1], want[1]):
        np.testing.assert_allclose(g, w, err_msg=name, **TOL)


def _softmax_np(s):
    p = np.exp(s - s.max())
    return p / p.sum()


def test_branches_and_head_split():
    q, k, v, _ = _qkv(9)
    o = np.asarray(
        jax.jit(hilo.hilo_attention, static_argnames=("grid_hw", "window", "n_hi"))(
            q, k, v, grid_hw=GRID, window=WIN, n_hi=2
        )
    )  # one compile; the expectations below are numpy
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    # Hi head 0, query at grid (0, 0): its window is tokens (0,0) (0,1) (1,0) (1,1)
    members = [0, 1, 6, 7]
    s = k[0, members, 0] @ q[0, 0, 0] / np.sqrt(8)
    np.testing.assert_allclose(o[0, 0, 0], _softmax_np(s) @ v[0, members, 0], **TOL)
    # Lo head 3: every query over the six window means
    win = [
        [r * 6 + c for r in range(a, a + 2) for c in range(b, b + 2)]
        for a in (0, 2)
        for b in (0, 2, 4)
    ]
    kp = np.stack([k[0, w, 3].mean(0) for w in win])
    vp = np.stack([v[0, w, 3].mean(0) for w in win])
    s = kp @ q[0, 13, 3] / np.sqrt(8)
    np.testing.assert_allclose(o[0, 13, 3], _softmax_np(s) @ vp, **TOL)
    with pytest.raises(ValueError, match="n_hi=5 must be in"):
        hilo.hilo_attention(q, k, v, grid_hw=GRID, window=WIN, n_hi=5)
    with pytest.raises(ValueError, match="must tile grid_hw"):
        hilo.hilo_attention(q, k, v, grid_hw=GRID, window=4, n_hi=1)
    with pytest.raises(ValueError, match="one kv head per query head"):
        hilo.hilo_attention(q, k[:, :, :2], v[:, :, :2], grid_hw=GRID, window=WIN, n_hi=1)
