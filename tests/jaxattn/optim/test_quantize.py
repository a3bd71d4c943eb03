"""8-bit block-wise states (jaxattn.optim.quantized): semantics, error bounds, bitsandbytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattn import optim

BLOCK = 256
# jitted once per shape and block size (eager, every op of quantize compiles its own program)
_quantize = jax.jit(optim.quantize, static_argnums=1)
_dequantize = jax.jit(optim.dequantize, static_argnums=1)


def _sample(n=5 * BLOCK + 77):  # a short last block
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n) * np.exp(rng.uniform(-12, 2, n))  # 6 decades of magnitude
    x[BLOCK : 2 * BLOCK] = np.abs(x[BLOCK : 2 * BLOCK])  # an all-non-negative block
    x[2 * BLOCK : 3 * BLOCK] = 0.0  # an all-zero block
    return x.astype(np.float32)


def test_codes_are_the_nearest_value_and_dequantise_exactly():
    x = _sample()
    q = _quantize(jnp.asarray(x), BLOCK)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == x.shape and q.absmax.shape == (6,)
    np.testing.assert_array_equal(np.asarray(q.unsigned)[1:3], [True, True])
    signed, unsigned = optim.dynamic_code_map(True), optim.dynamic_code_map(False)
    blocks = np.pad(x, (0, -x.size % BLOCK)).reshape(-1, BLOCK)
    absmax = np.abs(blocks).max(1)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    y = (blocks / np.where(absmax > 0, absmax, 1)[:, None]).reshape(-1)[: x.size]
    code = np.where(np.repeat(np.asarray(q.unsigned), BLOCK)[: x.size, None], unsigned, signed)
    dist = np.abs(y[:, None] - code)
    got = np.asarray(q.codes, np.int64)
    # nearest (ties are measure-zero here; the chosen code is at the minimal distance)
    np.testing.assert_allclose(dist[np.arange(x.size), got], dist.min(1), atol=0)
    deq = np.asarray(_dequantize(q, BLOCK))
    np.testing.assert_array_equal(
        deq, code[np.arange(x.size), got] * np.repeat(absmax, BLOCK)[: x.size]
    )
    np.testing.assert_array_equal(deq[2 * BLOCK : 3 * BLOCK], 0.0)
    # idempotent: the dequantised tensor quantises to the same codes
    q2 = _quantize(jnp.asarray(deq), BLOCK)
    np.testing.assert_array_equal(np.asarray(q2.codes), np.asarray(q.codes))
    # the documented bounds: 0.00704 * absmax (signed), 0.00352 * absmax (unsigned blocks)
    err = np.abs(deq - x) / np.repeat(np.where(absmax > 0, absmax, 1), BLOCK)[: x.size]
    uns = np.repeat(np.asarray(q.unsigned), BLOCK)[: x.size]
    assert err[~uns].max() <= 0.00704 and err[uns].max() <= 0.00352
    assert max(np.diff(signed).max() / 2, 1 + signed[0]) <= 0.00704
    assert np.diff(unsigned).max() / 2 <= 0.00352


def test_matches_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        np.testing.assert_array_equal(
            optim.dynamic_code_map(signed), bnb.create_dynamic_map(signed=signed).numpy()
        )
    rng = np.random.default_rng(1)
    code = optim.dynamic_code_map(True)
    normal = rng.standard_normal(8 * 2048).astype(np.float32)
    wide = (normal * np.exp(rng.uniform(-10, 0, normal.size))).astype(np.float32)
    for x in (normal, wide):
        q = _quantize(jnp.asarray(x), 2048)
        qt, st = bnb.quantize_blockwise(torch.tensor(x), blocksize=2048)
        np.testing.assert_array_equal(np.asarray(q.absmax), st.absmax.numpy())
        # dequantisation semantics are bitsandbytes': its kernel decodes our codes to our values
        st.absmax = torch.tensor(np.asarray(q.absmax))
        decoded = bnb.dequantize_blockwise(torch.tensor(np.asarray(q.codes)), st).numpy()
        np.testing.assert_array_equal(decoded, np.asarray(_dequantize(q, 2048)))
        # its CPU kernel's search is approximate; ours is the nearest code, never farther
        ours, theirs = np.asarray(q.codes), qt.numpy()
        y = x / np.repeat(np.asarray(q.absmax), 2048)
        assert np.all(np.abs(y - code[ours]) <= np.abs(y - code[theirs]) + 1e-7)
    assert (ours != theirs).mean() > 0.01  # (wide range: bitsandbytes misses small values)
    qn, qtn = (
        _quantize(jnp.asarray(normal), 2048),
        bnb.quantize_blockwise(torch.tensor(normal), blocksize=2048)[0],
    )
    assert (np.asarray(qn.codes) != qtn.numpy()).mean() < 0.002  # only next to midpoints


def test_quantize_state_stores_8_bit_and_tracks_adam():
    params = {"w": np.zeros((64, 128), np.float32), "b": np.zeros((128,), np.float32)}
    tx8 = optim.quantize_state(optax.adam(1e-2), block_size=BLOCK)
    tx = optax.adam(1e-2)
    s8, s = jax.jit(lambda p: (tx8.init(p), tx.init(p)))(params)
    mu = s8.inner[0].mu
    assert isinstance(mu["w"], optim.QuantizedArray) and mu["w"].codes.shape == (64, 128)
    assert isinstance(mu["b"], jax.Array)  # 128 entries < min_size: fp32
    both = jax.jit(lambda g, s8, s: (tx8.update(g, s8), tx.update(g, s)))
    rng = np.random.default_rng(0)  # numpy draws: no eager jax.random programs
    for t in range(20):
        g = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        (u8, s8), (u, s) = both(g, s8, s)
        w8, w = np.asarray(u8["w"]), np.asarray(u["w"])
        if t == 0:  # a zero state quantises exactly: the first step is Adam's
            np.testing.assert_array_equal(w8, w)
        rel = np.linalg.norm(w8 - w) / np.linalg.norm(w)
        assert rel < 0.05, (t, rel)
    np.testing.assert_array_equal(np.asarray(u8["b"]), np.asarray(u["b"]))


def test_galore_8_bit_moments():
    g = {"w": np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)}
    tx = optim.galore(optax.scale_by_adam(), rank=16, update_proj_gap=2, moment_bits=8)
    state = jax.jit(tx.init)(g)
    assert state.inner.inner.mu["w"].codes.shape == (16, 512)
    assert state.left["w"].dtype == jnp.float32  # the projector is not quantised
    u, _ = jax.jit(tx.update)(g, state)
    assert np.all(np.isfinite(np.asarray(u["w"])))
