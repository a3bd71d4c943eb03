"""SliceGPT (PAPERS.md §9) on a tiny DecoderLM with non-trivial norm scales and biases.

Faithful tests: the rotation alone (D' = D, norm scales folded into the readers as the paper
does) leaves the logits unchanged within 1e-4 fp32, tied or untied head; sliced shapes match
D'; the discarded eigenvalue share equals the calibration energy of the dropped directions and
falls with D', and so does the logit error; bad input raises named errors.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from jaxattn import convert as C
from models import convert as mc
from models.config import ModelConfig
from models.decoder import DecoderLM

D, VOCAB, TOL = 32, 61, 1e-4
RNG = np.random.default_rng(0)
CALIB = RNG.integers(0, VOCAB, (8, 16))


def _model(tie: bool) -> DecoderLM:
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=D,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=48,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        norm_eps=1e-5,
        tie_embeddings=tie,
    )
    # abstract init, weights drawn with numpy (no eager per-shape init compiles)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(1))))
    rng = np.random.default_rng(1)
    values = []
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "scale":  # norm scales far from 1, biases non-zero: folding is exercised
            value = rng.uniform(0.3, 2.0, var.shape)
        elif path[-1] == "bias":
            value = rng.normal(0, 0.2, var.shape)
        else:
            value = rng.normal(0, 1 / np.sqrt(D), var.shape)
        if path == ("embed", "table"):  # anisotropic stream: a few directions carry the energy
            value = rng.normal(0, 1, var.shape) * np.logspace(0.5, -1, D)
        values.append((path, var.replace(jnp.asarray(np.asarray(value, var.dtype)))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def _logits(model, tokens):
    return mc.logits(model, tokens)  # one compile per model structure


@pytest.fixture(scope="module")
def untied():
    return _model(False)


@pytest.mark.parametrize("tie", [False, True])
def test_rotation_alone_is_exact(tie, untied):
    model = untied if not tie else _model(True)
    ref = _logits(model, CALIB[:8])  # the conversion's own probe: one compile
    new, (report,) = mc.convert(model, "slicegpt", CALIB, dim=D)
    out = _logits(new, CALIB[:8])
    np.testing.assert_allclose(out, ref, atol=TOL)
    assert report["max_abs_logit_diff"] < TOL and report["discarded"] < 1e-6
    # the stream really was rotated (not the identity)
    assert not np.allclose(np.asarray(new.embed.table[...]), np.asarray(model.embed.table[...]))


def test_slicing_shapes_and_errors(untied, tmp_path):
    cov = mc.normed_covariance(untied, CALIB, batch_size=8)
    lam = np.linalg.eigvalsh(cov)[::-1]
    reports = []
    for dim in (8, 20, 32):
        new, (r,) = mc.slicegpt(untied, CALIB, dim=dim)
        assert new.config.d_model == dim and new.embed.table.shape == (VOCAB, dim)
        assert new.layers[0].attn.q.kernel.shape[0] == dim
        assert new.layers[0].mlp.down.kernel.shape[-1] == dim
        np.testing.assert_allclose(r["discarded"], lam[dim:].sum() / lam.sum(), atol=1e-6)
        reports.append(r)
        if dim == 20:  # the sliced model is a standard Llama checkpoint
            models.to_hf(new, str(tmp_path))
            back = models.from_hf(str(tmp_path))
            np.testing.assert_allclose(_logits(back, CALIB[:8]), _logits(new, CALIB[:8]), atol=TOL)
    discarded = [r["discarded"] for r in reports]
    errors = [r["relative_logit_error"] for r in reports]
    assert all(a > b for a, b in zip(discarded, discarded[1:], strict=False))
    assert errors[0] > errors[1] > errors[-1] and errors[-1] < 1e-5
    params = [r["parameters"] for r in reports]
    assert all(a < b for a, b in zip(params, params[1:], strict=False))


def test_discarded_share_is_the_dropped_energy():
    x = RNG.normal(size=(200, 6)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    cov = x.T @ x
    q, info = C.pca_rotation(cov, 3)
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)
    kept = np.linalg.norm(x @ q) ** 2
    np.testing.assert_allclose(info["discarded"], 1 - kept / np.linalg.norm(x) ** 2, atol=1e-12)


def test_bad_input(untied):
    for dim in (0, D + 1, 2.5):
        with pytest.raises(ValueError, match="dim"):
            mc.slicegpt(untied, CALIB, dim=dim)
    with pytest.raises(ValueError, match="calibration tokens"):
        mc.slicegpt(untied, CALIB[:2], dim=16)
    with pytest.raises(ValueError, match="cov_DD"):
        C.pca_rotation(np.ones((3, 4)), 2)
    mla = nnx.eval_shape(
        lambda: DecoderLM(
            ModelConfig(
                vocab_size=VOCAB,
                d_model=D,
                num_layers=1,
                num_heads=2,
                mlp_dim=16,
                attention="mla",
                kv_lora_rank=8,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=8,
            ),
            rngs=nnx.Rngs(0),
        )
    )  # fmt: skip; abstract: the kind check comes first
    with pytest.raises(ValueError, match="'mha' layers"):
        mc.slicegpt(mla, CALIB, dim=16)
