"""The §9 weight-compression methods on a whole DecoderLM and in the CLI (``models.convert``:
``--method lorc | lord | trp | welore``).

Exact reductions: LoRC's full-rank compensation of the RTN error, TRP at energy 1 and WeLore at
reduction 0 leave the logits unchanged (1e-4, fp32); LoRD's factors are the rank-k SVD of each
projection (k = ⌊(1 − ρ) min(m, n)⌋) with the parameter count k (m + n); the CLI prints the
before/after table and writes an HF checkpoint whose logits equal the compressed model's.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import convert as mc
from models.config import ModelConfig
from models.decoder import DecoderLM

VOCAB, TOL = 61, 1e-4
RNG = np.random.default_rng(0)
CALIB = RNG.integers(0, VOCAB, (4, 16))


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      mlp_dim=48, norm_eps=1e-5, tie_embeddings=False)  # fmt: skip
    return DecoderLM(cfg, rngs=nnx.Rngs(1))


def _logits(m):
    return np.asarray(m(jnp.asarray(CALIB)), np.float64)


@pytest.mark.parametrize(
    "method, options",
    [("lorc", {"bits": 3, "rank": 48}), ("trp", {"energy": 1.0}), ("welore", {"reduction": 0.0})],
)
def test_exact_reductions_keep_the_logits(model, method, options):
    new, [report] = mc.convert(model, method, CALIB, **options)
    np.testing.assert_allclose(_logits(new), _logits(model), atol=TOL)
    assert report["max_abs_logit_diff"] < TOL and report["mean_relative_error"] < 1e-5


def test_lord_factors_are_the_rank_k_svd(model):
    new, [report] = mc.convert(model, "lord", CALIB, reduction=0.75)
    q_old, q_new = model.layers[0].attn.q, new.layers[0].attn.q
    w = np.asarray(q_old.as_matrix(), np.float64)  # [32, 4·8]
    k = 8  # ⌊0.25 · 32⌋
    u, s, vt = np.linalg.svd(w)
    np.testing.assert_allclose(np.asarray(q_new.as_matrix()), (u[:, :k] * s[:k]) @ vt[:k],
                               atol=1e-5)  # fmt: skip
    assert q_new.form is not None and model.layers[0].attn.q.form is None  # the source is kept
    dense = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # 7 projections: q [32, 32], k, v [32, 16], o [32, 32], gate, up [32, 48], down [48, 32]
    shapes = [(32, 32, 8), (32, 16, 4), (32, 16, 4), (32, 32, 8)] + [(32, 48, 8)] * 3
    saved = sum(m * n - kk * (m + n) for m, n, kk in shapes)
    assert report["parameters"] == dense - saved
    assert 0 < report["relative_logit_error"] and report["mean_relative_error"] > 0.1


def test_bad_input_is_named(model):
    with pytest.raises(ValueError, match="lord: layers/0/attn/.*saves no parameters"):
        mc.convert(model, "lord", CALIB, reduction=0.0)
    with pytest.raises(ValueError, match="no options \\['dim'\\]"):
        mc.convert(model, "trp", CALIB, dim=3)
    with pytest.raises(ValueError, match="energy"):
        mc.convert(model, "trp", CALIB, energy=1.5)


def test_cli_lord_table_and_export(model, tmp_path, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    models.to_hf(model, src)
    mc.main(["--from", src, "--to", out, "--method", "lord", "--set", "reduction=0.75",
             "--calib-rows", "2", "--eval-rows", "1", "--seq-len", "16"])  # fmt: skip
    text = capsys.readouterr().out
    for row in ("parameters", "cache bytes / token", "eval perplexity", "step lord:"):
        assert row in text
    before, after = next(ln for ln in text.splitlines() if ln.startswith("param")).split()[-2:]
    assert int(after) < int(before)
    compressed, _ = mc.convert(models.from_hf(src), "lord", CALIB, reduction=0.75)
    np.testing.assert_allclose(_logits(models.from_hf(out)), _logits(compressed), atol=TOL)
