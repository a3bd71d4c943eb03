"""ZipCache's channel-separable tokenwise quantization (PAPERS.md §5 faithful test): fewer
quantization parameters than groupwise for the same shapes, the dequantization is the paper's
formula (checked in numpy), and with outlier channels its error is far below plain tokenwise
quantization's and close to groupwise's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops.kv_quant import dequantize, quantize
from jaxattn.ops.zipcache import (
    channel_separable_dequantize,
    channel_separable_quantize,
    num_quant_params,
)

T, D, G, BITS = 64, 32, 8, 4


@jax.jit
def _errors(x):
    """Mean squared errors of ZipCache's, plain tokenwise and groupwise (G channels) 4-bit
    quantization, and ZipCache's dequantized matrix (one compile)."""
    codes, s, z, c = channel_separable_quantize(x, BITS, scale_dtype=jnp.float32)
    zip_x = channel_separable_dequantize(codes, s, z, c)
    tok = dequantize(*quantize(x, BITS, -1, scale_dtype=jnp.float32))
    grp = dequantize(*quantize(x.reshape(T, D // G, G), BITS, -1, scale_dtype=jnp.float32))
    mse = lambda y: jnp.mean((y.reshape(T, D) - x) ** 2)  # noqa: E731
    return mse(zip_x), mse(tok), mse(grp), zip_x, (codes, s, z, c)


def test_channel_separable_quantization_is_the_formula_with_fewer_params_than_groupwise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D), np.float32)
    x[:, [3, 17]] *= 30.0  # outlier channels
    e_zip, e_tok, e_grp, zip_x, (codes, s, z, c) = _errors(x)
    # the formula in numpy: c_i = sqrt(max_t |x_ti|), per-token min-max codes of x / c
    c_np = np.sqrt(np.abs(x).max(0, keepdims=True))
    np.testing.assert_allclose(c, c_np, rtol=1e-6)
    xn = x / c_np
    lo, hi = xn.min(1, keepdims=True), xn.max(1, keepdims=True)
    step = (hi - lo) / (2**BITS - 1)
    np.testing.assert_allclose(s, step, rtol=1e-6)
    q = np.clip(np.round((xn - lo) / step), 0, 2**BITS - 1)
    assert np.mean(np.asarray(codes) == q) > 0.999  # ties at .5 may round either way
    np.testing.assert_allclose(zip_x, (np.asarray(codes) * step + lo) * c_np, rtol=1e-5, atol=1e-5)
    # the parameter count: D + 2T against groupwise 2·T·D/G
    assert num_quant_params(T, D) == D + 2 * T == 160
    assert num_quant_params(T, D) < num_quant_params(T, D, group_size=G) == 512
    assert s.size + z.size + c.size == num_quant_params(T, D)
    # outlier channels: far below tokenwise, within a few times groupwise's error
    assert float(e_zip) < 0.2 * float(e_tok), (float(e_zip), float(e_tok))
    assert float(e_zip) < 4 * float(e_grp), (float(e_zip), float(e_grp))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"x_TD must be \[T, D\]"):
        channel_separable_quantize(jnp.ones((2, 3, 4)), 4)
    with pytest.raises(ValueError, match=r"group_size=5 must divide channels=32"):
        num_quant_params(T, D, group_size=5)
