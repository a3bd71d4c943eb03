"""Titans' neural memory (jaxattn.ops.titans) against the paper's equations in numpy (float64).

* chunk size 1 == the per-token recurrence of Eq. 13-15 written in numpy with a hand-derived
  gradient of ℓ = ‖M(k) − v‖² for a 2-layer SiLU MLP:
  S_t = η_t S_{t-1} − θ_t ∇ℓ(M_{t-1}), M_t = (1 − α_t) M_{t-1} + S_t, y_t = M_t(q_t);
  and == the decoding step ``titans_memory_step`` scanned token by token;
* chunk size C == a plain loop that takes every gradient of a chunk at the chunk-start weights
  (same momentum / forgetting recurrences per token), and differs from C = 1;
* θ = 0, α = 0: the memory is constant (y_t = M_0(q_t)); θ = 0, α > 0: M_T = Π(1 − α_t) M_0;
* a depth-1 memory with η = 0, α = 0 is the delta rule with β = 2θ (``linear_attention``);
* jax.grad of the output wrt q, k, v, gates and M_0 is finite and non-zero; bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops import linear_attention
from jaxattn.ops.titans import titans_memory, titans_memory_step

B, T, N, H, HM = 1, 8, 2, 4, 8
TOL = dict(atol=2e-5, rtol=2e-5)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_mlp(w1, w2, x):
    h = x @ w1
    return (h * _sig(h)) @ w2


def _np_grad(w1, w2, k, v):
    """∇ℓ for ℓ = ‖silu(k W1) W2 − v‖², by hand: the chain rule through the SiLU."""
    h = k @ w1
    s = _sig(h)
    a = h * s
    r = a @ w2 - v
    g2 = 2.0 * np.outer(a, r)
    da = 2.0 * (w2 @ r)
    dh = da * s * (1.0 + h * (1.0 - s))  # silu'(h)
    return np.outer(k, dh), g2


def _np_titans(q, k, v, lr, mom, dec, w1, w2, chunk):
    """Eq. 13-15 per token; gradients at the start weights of each chunk of ``chunk`` tokens."""
    q, k, v, lr, mom, dec, w1, w2 = (
        np.asarray(x, np.float64) for x in (q, k, v, lr, mom, dec, w1, w2)
    )
    y = np.zeros(v.shape)
    w1_out, w2_out = np.zeros(w1.shape), np.zeros(w2.shape)
    for b in range(q.shape[0]):
        for n in range(q.shape[2]):
            m1, m2 = w1[b, n].copy(), w2[b, n].copy()
            s1, s2 = np.zeros_like(m1), np.zeros_like(m2)
            for c0 in range(0, q.shape[1], chunk):
                a1, a2 = m1.copy(), m2.copy()  # chunk-start weights M_{t'}
                for t in range(c0, c0 + chunk):
                    g1, g2 = _np_grad(a1, a2, k[b, t, n], v[b, t, n])
                    s1 = mom[b, t, n] * s1 - lr[b, t, n] * g1  # Eq. 14
                    s2 = mom[b, t, n] * s2 - lr[b, t, n] * g2
                    m1 = (1 - dec[b, t, n]) * m1 + s1  # Eq. 13
                    m2 = (1 - dec[b, t, n]) * m2 + s2
                    y[b, t, n] = _np_mlp(m1, m2, q[b, t, n])  # Eq. 15
            w1_out[b, n], w2_out[b, n] = m1, m2
    return y, w1_out, w2_out


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    u = lambda lo, hi: rng.uniform(lo, hi, (B, T, N)).astype(np.float32)  # noqa: E731
    q, k, v = f(B, T, N, H), f(B, T, N, H) / 2, f(B, T, N, H)
    w1, w2 = f(B, N, H, HM) / 2, f(B, N, HM, H) / 3
    return dict(q=q, k=k, v=v, lr=u(0.01, 0.1), mom=u(0.5, 0.95), dec=u(0.0, 0.1), w=(w1, w2))


_op = jax.jit(titans_memory, static_argnames=("chunk_size", "activation"))


def _run(c, chunk, **over):
    a = {**c, **over}
    return _op(a["q"], a["k"], a["v"], a["lr"], a["mom"], a["dec"], a["w"], chunk_size=chunk)


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_equals_numpy_equations(case, chunk):
    y, (w1, w2), _ = _run(case, chunk)
    ref_y, ref_w1, ref_w2 = _np_titans(
        case["q"], case["k"], case["v"], case["lr"], case["mom"], case["dec"], *case["w"], chunk
    )
    np.testing.assert_allclose(y, ref_y, **TOL)
    np.testing.assert_allclose(w1, ref_w1, **TOL)
    np.testing.assert_allclose(w2, ref_w2, **TOL)
    if chunk > 1:  # chunk-start gradients are an approximation: C = 4 is not C = 1
        exact, *_ = _np_titans(
            case["q"], case["k"], case["v"], case["lr"], case["mom"], case["dec"], *case["w"], 1
        )
        assert np.max(np.abs(np.asarray(y) - exact)) > 1e-4


def test_decode_step_scan_equals_chunk1(case):
    """The decoding form (one token at a time) is the C = 1 form, outputs and final state."""
    y, w, s = _run(case, 1)

    @jax.jit
    def scan_one(w0, q, k, v, lr, mo, de):  # one head: [T, H] inputs, scalar gates per step
        def step(carry, x):
            out, wt, st = titans_memory_step(*carry, *x)
            return (wt, st), out

        zeros = tuple(jnp.zeros_like(a) for a in w0)
        (wt, st), out = jax.lax.scan(step, (w0, zeros), (q, k, v, lr, mo, de))
        return out, wt, st

    for n in range(N):
        sel = lambda x: x[0, :, n]  # noqa: E731
        out, wt, st = scan_one(
            tuple(a[0, n] for a in case["w"]),
            *(sel(case[name]) for name in ("q", "k", "v", "lr", "mom", "dec")),
        )
        np.testing.assert_allclose(out, y[0, :, n], atol=1e-6, rtol=1e-6)
        for a, b in zip(wt + st, tuple(x[0, n] for x in w + s)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_zero_lr_keeps_memory(case):
    zeros = np.zeros_like(case["lr"])
    y, w, s = _run(case, 4, lr=zeros, dec=zeros)
    np.testing.assert_array_equal(w[0], case["w"][0])
    np.testing.assert_array_equal(w[1], case["w"][1])
    assert not np.any(np.asarray(s[0])) and not np.any(np.asarray(s[1]))
    h = np.einsum("btnh,bnhm->btnm", case["q"].astype(np.float64), case["w"][0])
    ref = np.einsum("btnm,bnmh->btnh", h * _sig(h), case["w"][1])  # y_t = M_0(q_t)
    np.testing.assert_allclose(y, ref, **TOL)
    # forgetting alone: M_T = Π_t (1 − α_t) M_0
    _, w, _ = _run(case, 4, lr=zeros)
    keep = np.prod(1.0 - case["dec"].astype(np.float64), axis=1)  # [B, N]
    np.testing.assert_allclose(w[0], keep[..., None, None] * case["w"][0], **TOL)


def test_linear_memory_is_delta_rule(case):
    """Depth 1, M_0 = 0, η = α = 0: M_t = M_{t-1} + 2θ_t k_t (v_t − k_t M_{t-1}) (delta rule)."""
    zeros = np.zeros_like(case["lr"])
    w0 = (np.zeros((B, N, H, H), np.float32),)
    y, (w,), _ = _run(case, 1, mom=zeros, dec=zeros, w=w0)
    o, state = linear_attention(
        case["q"], case["k"], case["v"], variant="delta_rule", beta=2 * case["lr"],
        scale=1.0, implementation="recurrent", return_state=True,
    )  # fmt: skip
    np.testing.assert_allclose(y, o, **TOL)
    np.testing.assert_allclose(w, state, **TOL)


def test_gradients_flow(case):
    def loss(q, k, v, lr, mom, dec, w):
        y, _, _ = titans_memory(q, k, v, lr, mom, dec, w, chunk_size=4)
        return jnp.sum(jnp.sin(y))

    names = ("q", "k", "v", "lr", "mom", "dec", "w")
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*(case[n] for n in names))
    for name, g in zip(names, grads):
        for leaf in jax.tree.leaves(g):
            assert np.all(np.isfinite(leaf)), name
            assert np.any(np.asarray(leaf) != 0), name


def test_bad_input(case):
    c = case
    with pytest.raises(ValueError, match="chunk_size"):
        titans_memory(c["q"], c["k"], c["v"], c["lr"], c["mom"], c["dec"], c["w"], chunk_size=3)
    with pytest.raises(ValueError, match="lr gate"):
        titans_memory(c["q"], c["k"], c["v"], c["lr"][..., :1], c["mom"], c["dec"], c["w"])
    with pytest.raises(ValueError, match="chain"):
        titans_memory(
            *(c[n] for n in ("q", "k", "v", "lr", "mom", "dec")), (*c["w"], c["w"][1]), chunk_size=4
        )
    with pytest.raises(ValueError, match="activation"):
        titans_memory(
            *(c[n] for n in ("q", "k", "v", "lr", "mom", "dec", "w")), chunk_size=4, activation="x"
        )
