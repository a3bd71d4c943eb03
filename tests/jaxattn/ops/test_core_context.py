"""Core Context Aware attention (jaxattn.ops.core_context): uniform weights give mean pooling,
the local branch alone is sliding-window attention, the fused result equals the naive
concatenated reference forward and backward (GQA)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from visit_case import fast_jit, normal  # numpy inputs: jax.random.normal compiles once per shape

from jaxattn import dot_product_attention, masks
from jaxattn.ops import core_context as cca

TOL = dict(atol=2e-5, rtol=2e-5)


def _qkv(seed, T=30, K=2, G=2, H=8):
    return normal(seed, *((2, T, n, H) for n in (K * G, K, K, K * G)))


def test_fused_equals_concatenated_reference_fwd_bwd():
    q, k, v, do = _qkv(0)
    kw = dict(group=4, window=6)

    def both(q, k, v, do):  # the fused op and the reference, in one compiled call
        f = lambda fn: jax.value_and_grad(  # noqa: E731
            lambda *a: jnp.sum(fn(*a, **kw) * do), argnums=(0, 1, 2)
        )(q, k, v)
        return f(cca.core_context_attention), f(cca.core_context_reference)

    got, want = fast_jit(both)(q, k, v, do)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for name, g, w in zip(("dq", "dk", "dv"), got[1], want[1]):
        np.testing.assert_allclose(g, w, err_msg=name, **TOL)


def test_uniform_weights_are_mean_pooling_and_local_branch_is_window():
    q, k, v, _ = _qkv(1)
    q0 = q.at[:, 3::4].set(0.0)  # the groups' last queries: zero scores -> uniform weights
    kc, vc, w = cca.core_tokens(q0, k, v, group=4)
    np.testing.assert_allclose(w, 0.25, rtol=1e-6)
    np.testing.assert_allclose(kc, k[:, :28].reshape(2, 7, 4, 2, 8).mean(2), rtol=1e-5, atol=1e-6)
    # no complete group before T = 3 < g: only the window branch, i.e. SlidingWindow attention
    got = cca.core_context_attention(q[:, :3], k[:, :3], v[:, :3], group=4, window=2)
    want = dot_product_attention(q[:, :3], k[:, :3], v[:, :3], mask=masks.SlidingWindow(left=1))
    np.testing.assert_allclose(got, want, **TOL)
    with pytest.raises(ValueError, match="group=0"):
        cca.core_context_attention(q, k, v, group=0, window=2)
