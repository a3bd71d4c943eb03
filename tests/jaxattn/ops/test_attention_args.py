"""What the op does with awkward arguments (issue 12): concrete values are validated with errors
naming the argument, every real scalar type is accepted, traced values behave as documented;
array-likes work; block-size and interpreter errors say what is needed; rope messages name
fields properly; ``import jaxattn`` loads no Pallas module."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from visit_case import assert_close, inputs

from jaxattn import dot_product_attention as attention
from jaxattn import masks
from jaxattn.ops import ChunkedBlockSizes, DecodeBlockSizes

TOL = dict(atol=2e-5, rtol=2e-5)
Q, K_, V_, _ = inputs(0, 2, 8, 16, 4, 2, 16, 16)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kv_lengths=jnp.array([-3, 16])), r"kv_lengths must lie in \[0, S=16\]"),
        (dict(kv_lengths=np.array([100, 4])), r"kv_lengths must lie in \[0, S=16\]"),
        (dict(q_offset=1000), r"q_offset .* must lie in \[0, S=16\], got 1000"),
        (dict(q_offset=-1), r"q_offset .* must lie in \[0, S=16\]"),
        (dict(q_offset=jnp.array([0, 20])), r"q_offset .* must lie in \[0, S=16\], got \[0, 20\]"),
        (dict(q_offset=True), "q_offset must be an int"),
        (dict(logits_soft_cap=True), "logits_soft_cap must be a positive real"),
        (dict(logits_soft_cap="5"), "logits_soft_cap must be a positive real"),
        (dict(logits_soft_cap=0.0), "logits_soft_cap must be a positive finite"),
        (dict(scale=True), "scale must be a positive real"),
        (dict(scale=jnp.array([0.5])), "scale must be a positive real"),
        (dict(scale=float("nan")), "scale must be a positive finite"),
        (dict(scale=-np.float32(2)), "scale must be a positive finite"),
        (dict(scale=jnp.array(1, jnp.bool_)), "scale must be a positive real"),
    ],
)
def test_concrete_values_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        attention(Q, K_, V_, **kw)


@pytest.mark.parametrize(
    "scale", [np.float32(0.5), np.float64(0.5), jnp.float32(0.5), jnp.array(0.5)]
)
def test_every_real_scalar_type_is_a_scale(scale):
    want = attention(Q, K_, V_, scale=0.5, logits_soft_cap=3.0, implementation="xla")
    for impl in ("xla", "chunked", "decode"):
        got = attention(
            Q, K_, V_, scale=scale, logits_soft_cap=np.float32(3.0), implementation=impl
        )
        assert_close(got, want, TOL, impl)
    assert_close(attention(Q, K_, V_, scale=1, implementation="chunked"),
                 attention(Q, K_, V_, scale=1.0, implementation="xla"), TOL)  # fmt: skip


def test_traced_scale_is_a_constant_and_kernels_refuse_it():
    from jax.experimental.pallas import tpu as pltpu

    want = attention(Q, K_, V_, scale=0.3, implementation="xla")
    for impl in ("xla", "chunked", "decode"):
        got = jax.jit(lambda s, impl=impl: attention(Q, K_, V_, scale=s, implementation=impl))(0.3)
        assert_close(got, want, TOL, impl)
    grad = jax.grad(lambda s: attention(Q, K_, V_, scale=s, implementation="chunked").sum())(0.3)
    assert float(grad) == 0.0  # documented: no gradient flows to a scale
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        with pytest.raises(NotImplementedError, match="traced scale"):
            jax.jit(lambda s: attention(Q, K_, V_, scale=s, implementation="pallas_tpu"))(0.3)


def test_traced_lengths_are_clipped_and_traced_offsets_used_as_given():
    run = jax.jit(
        lambda lens, off: attention(
            Q, K_, V_, mask=masks.Causal(), kv_lengths=lens, q_offset=off, implementation="chunked"
        )
    )
    clipped = run(jnp.array([0, 16]), jnp.int32(4))
    assert_close(run(jnp.array([-3, 100]), jnp.int32(4)), clipped, TOL)
    # a negative offset: rows at negative positions see no key (zeros); the rest are shifted
    neg = run(jnp.array([16, 16]), jnp.int32(-4))
    assert (np.asarray(neg[:, :4]) == 0).all()
    shifted = attention(Q[:, 4:], K_, V_, mask=masks.Causal(), implementation="xla")
    assert_close(neg[:, 4:], shifted, TOL)


def test_array_likes_are_accepted():
    q, k, v = (np.asarray(x).tolist() for x in (Q, K_, V_))
    assert_close(attention(q, k, v), attention(Q, K_, V_), TOL)
    with pytest.raises(ValueError, match="q must be a floating array"):
        attention([[[[1, 2]]]], K_, V_)


def test_block_sizes_errors_name_what_was_passed(caplog):
    with pytest.raises(ValueError, match=r"got tuple .*ChunkedBlockSizes for 'chunked'"):
        attention(Q, K_, V_, block_sizes=(8, 8))
    with pytest.raises(ValueError, match=r"must be jaxattn.ops.ChunkedBlockSizes, got Decode"):
        attention(Q, K_, V_, implementation="chunked", block_sizes=DecodeBlockSizes())
    with pytest.raises(ValueError, match="pallas_kernels.flash_attention.BlockSizes"):
        attention(Q, K_, V_, implementation="pallas_gpu", block_sizes=ChunkedBlockSizes())
    from pallas_kernels.flash_attention import BlockSizes

    with caplog.at_level(logging.WARNING, logger="jaxattn"):  # auto on CPU: the kernel's
        got = attention(Q, K_, V_, block_sizes=BlockSizes(block_q=16))  # blocks are unused
    assert_close(got, attention(Q, K_, V_, implementation="xla"), TOL)
    assert "ignores block_sizes=BlockSizes" in caplog.text


def test_pallas_gpu_error_names_the_real_interpreter_switch():
    with pytest.raises(NotImplementedError) as e:
        attention(Q, K_, V_, implementation="pallas_gpu")
    assert "jax._src.pallas.mosaic_gpu.interpret.params.force_gpu_interpret_mode(" in str(e.value)
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from jax._src.pallas.mosaic_gpu.interpret.params import force_gpu_interpret_mode

    assert callable(force_gpu_interpret_mode)


def test_rope_messages_name_fields_not_self():
    from jaxattn.ops import LinearScaling, Llama3Scaling, RopeConfig

    for make, field in (
        (lambda: Llama3Scaling(low_freq_factor=4.0, high_freq_factor=4.0), "Llama3Scaling.high"),
        (lambda: LinearScaling(factor=0.0), "LinearScaling.factor"),
        (lambda: RopeConfig(theta=-1.0), "RopeConfig.theta"),
    ):
        with pytest.raises(ValueError) as e:
            make()
        assert "self." not in str(e.value) and field in str(e.value)


def test_import_jaxattn_loads_no_pallas_module():
    code = (
        "import sys, flax.nnx, optax\n"  # what jaxattn's dependencies load is theirs
        "before = set(sys.modules)\n"
        "import jaxattn\n"
        "new = set(sys.modules) - before\n"
        "bad = [m for m in new if m.startswith(('jax.experimental.pallas', 'jax._src.pallas',"
        " 'pallas_kernels.flash_attention')) or m.split('.')[-1] in ('tpu', 'gpu')]\n"
        "print(sorted(bad))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
