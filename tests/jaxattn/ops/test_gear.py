"""GEAR's D̂ + L + S (PAPERS.md §5 faithful tests): error below quantization alone, exact at full
rank, S with the configured sparsity and L with the configured rank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops.gear import gear_approximation
from jaxattn.ops.kv_quant import dequantize, quantize


def _kv():
    x = jax.random.normal(jax.random.key(0), (64, 32))
    return x.at[jax.random.randint(jax.random.key(1), (20,), 0, 64), 3].set(25.0)  # outliers


def test_gear_error_is_below_quantization_alone_and_exact_at_full_rank():
    x = _kv()
    codes, scale, zero = quantize(x.reshape(64, 4, 8), 2, -1, scale_dtype=jnp.float32)
    quant_only = np.linalg.norm(dequantize(codes, scale, zero).reshape(64, 32) - x)
    plain = gear_approximation(x, bits=2, rank=0, outliers=0, group_size=8)["approx"]
    np.testing.assert_allclose(np.linalg.norm(plain - x), quant_only, rtol=1e-6)  # = quantization
    errors = []
    for rank, outliers in ((0, 32), (4, 32), (8, 32)):
        parts = gear_approximation(x, bits=2, rank=rank, outliers=outliers, group_size=8)
        errors.append(float(np.linalg.norm(parts["approx"] - x)))
        assert int(np.count_nonzero(parts["sparse"])) == outliers  # the configured sparsity
        assert int(np.linalg.matrix_rank(np.asarray(parts["low_rank"]), tol=1e-4)) == rank
        if rank == 0:  # S restores the outliers exactly (L, fitted to the residual, adds to them)
            restored = np.asarray(parts["sparse"]) != 0
            np.testing.assert_array_equal(np.asarray(parts["approx"])[restored], x[restored])
    assert errors[0] < 0.5 * quant_only and errors[2] < errors[1] < errors[0]
    full = gear_approximation(x, bits=2, rank=32, outliers=32, group_size=8)["approx"]
    np.testing.assert_allclose(full, x, atol=1e-4)  # full rank reproduces the matrix


def test_gear_bad_input_names_the_argument():
    x = jnp.ones((4, 8))
    cases = (
        (dict(rank=5), r"rank=5 must be in \[0, min\(T, D\)=4\]"),
        (dict(outliers=33), "outliers=33"),
        (dict(group_size=3), "group_size=3"),
    )
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            gear_approximation(x, **{"bits": 2, "rank": 0, "outliers": 0, **kw})
