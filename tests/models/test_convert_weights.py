"""The §9 weight-compression methods on a whole DecoderLM and in the CLI (``models.convert``:
``--method lorc | lord | trp | welore | eora``).

Exact reductions: LoRC's full-rank compensation of the RTN error, TRP at energy 1 and WeLore at
reduction 0 leave the logits unchanged (1e-4, fp32); LoRD's factors are the rank-k SVD of each
projection (k = ⌊(1 − ρ) min(m, n)⌋) with the parameter count k (m + n); the CLI prints the
before/after table and writes an HF checkpoint whose logits equal the compressed model's.
EoRA: the per-projection input covariances are E[x xᵀ] of what each projection reads; at full
rank the compensation restores W (logits unchanged); at low rank its activation-weighted error
is never above LoRC's plain SVD at the same rank.
MoDeGPT (Type I Nyström on the MLP, Type III SVD on value/output): keep=1 leaves the logits
unchanged; at keep=0.5 the parameter count is the reduced widths' and the value-output error is
below per-weight SVD at equal size; a narrower value head is refused by the HF export.
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
    # abstract init, weights drawn with numpy (no eager per-shape init compiles)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(1))))
    rng = np.random.default_rng(1)
    values = []
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "scale":
            value = rng.uniform(0.5, 1.5, var.shape)
        else:
            value = rng.normal(0, 1 / np.sqrt(32), var.shape)
        values.append((path, var.replace(jnp.asarray(np.asarray(value, var.dtype)))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def _logits(m):
    return mc.logits(m, CALIB).astype(np.float64)  # jitted: one compile per model structure


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


def test_eora_full_rank_is_exact_and_low_rank_beats_lorc(model):
    new, [report] = mc.convert(model, "eora", CALIB, bits=3, rank=48, batch_size=4)
    np.testing.assert_allclose(_logits(new), _logits(model), atol=TOL)
    assert report["max_abs_logit_diff"] < TOL and report["mean_relative_error"] < 1e-5
    _, [low] = mc.convert(model, "eora", CALIB, bits=3, rank=2, batch_size=4)
    assert 0 < low["mean_relative_error"] <= low["mean_relative_error_lorc"]
    assert low["mean_relative_error"] < low["mean_relative_error_lorc"] * 0.999  # strictly


def test_projection_covariances_are_the_inputs_second_moments(model):
    covs = mc.projection_covariances(model, CALIB, batch_size=4)
    blk = model.layers[0]
    x = np.asarray(blk.attn_norm(model.embed(jnp.asarray(CALIB))), np.float64).reshape(-1, 32)
    np.testing.assert_allclose(covs["layers/0/attn/q"], x.T @ x / len(x), atol=1e-5)
    assert covs["layers/0/attn/o"].shape == (32, 32)  # N·V = 4·8 per-head outputs
    assert covs["layers/0/mlp/down"].shape == (48, 48)
    assert set(covs) == {f"layers/0/{n}" for n in
                         ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up",
                          "mlp/down")}  # fmt: skip
    with pytest.raises(ValueError, match="eora needs calibration tokens"):
        mc.convert(model, "eora", None)


# -- MoDeGPT (models._convert_modegpt): Type I Nyström on the MLP, Type III SVD on v / o ---------
def test_modegpt_keep_one_is_exact(model):
    new, [report] = mc.convert(model, "modegpt", CALIB, keep=1.0, batch_size=4)
    np.testing.assert_allclose(_logits(new), _logits(model), atol=TOL)
    assert report["max_abs_logit_diff"] < TOL and report["mean_relative_error"] < 1e-5
    assert new.config.mlp_dim == 48 and report["v_head_dim"] == 8


def test_modegpt_compressed_count_and_errors(model, tmp_path):
    new, [report] = mc.convert(model, "modegpt", CALIB, keep="0.5", batch_size=4)
    dense = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # MLP 48 -> 24 intermediate dims (gate, up, down: 3 · 32 each); value heads 8 -> 4 dims
    # (v: 2 kv heads, o: 4 query heads, 32 wide each)
    assert report["parameters"] == dense - 3 * 32 * 24 - 32 * (2 + 4) * 4
    assert new.config.mlp_dim == 24 and new.layers[0].attn.v.kernel.shape == (32, 2, 4)
    assert 0 < report["mlp_relative_error"] < 1 and 0 < report["relative_logit_error"] < 1
    # Type III's weighted SVD is the Eckart-Young optimum: below per-weight SVD at equal size
    assert 0 < report["vo_relative_error"] < report["vo_relative_error_svd"]
    # Nyström keeps columns of gate / up as they are (only the down projection is refitted)
    old_gate = np.asarray(model.layers[0].mlp.gate.kernel[...])
    new_gate = np.asarray(new.layers[0].mlp.gate.kernel[...])
    assert all(np.abs(old_gate - col[:, None]).max(0).min() == 0 for col in new_gate.T)
    mlp_only, [r] = mc.convert(model, "modegpt", CALIB, keep=0.5, types="mlp", batch_size=4)
    assert mlp_only.layers[0].attn.v.kernel.shape == (32, 2, 8) and "vo_relative_error" not in r
    # the HF GQA formats hold one head_dim: a narrower value head is refused, not written
    with pytest.raises(ValueError, match="v_head_dim=4 != head_dim=8"):
        models.to_hf(new, str(tmp_path / "hf"))


@pytest.mark.slow  # the CLI path is test_cli_lord_table_and_export's; modegpt's by the cases above
def test_cli_modegpt_mlp_exports(model, tmp_path, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    models.to_hf(model, src)
    mc.main(["--from", src, "--to", out, "--method", "modegpt", "--set", "keep=0.5",
             "--set", "types=mlp", "--set", "batch_size=4", "--calib-rows", "4",
             "--eval-rows", "1", "--seq-len", "16"])  # fmt: skip
    text = capsys.readouterr().out
    assert "step modegpt:" in text and "mlp_relative_error" in text
    before, after = next(ln for ln in text.splitlines() if ln.startswith("param")).split()[-2:]
    assert int(before) - int(after) == 3 * 32 * 24
    assert models.from_hf(out).config.mlp_dim == 24


def test_modegpt_bad_input_is_named(model):
    with pytest.raises(ValueError, match="keep=0"):
        mc.convert(model, "modegpt", CALIB, keep=0, batch_size=4)
    with pytest.raises(ValueError, match="keep=1.5"):
        mc.convert(model, "modegpt", CALIB, keep=1.5, batch_size=4)
    with pytest.raises(ValueError, match="types=\\('qk',\\)"):
        mc.convert(model, "modegpt", CALIB, types="qk", batch_size=4)
    with pytest.raises(ValueError, match="modegpt needs calibration tokens"):
        mc.convert(model, "modegpt", None)
    with pytest.raises(ValueError, match="32 tokens, fewer than the 48 kept MLP dims"):
        mc.convert(model, "modegpt", CALIB[:, :8], keep=1.0, batch_size=4)
    with pytest.raises(ValueError, match="no options \\['rank'\\]"):
        mc.convert(model, "modegpt", CALIB, rank=3)
    lowrank = nnx.eval_shape(lambda: DecoderLM(model.config.replace(
        parameterization="lowrank", parameterization_rank=4), rngs=nnx.Rngs(0)))  # fmt: skip
    with pytest.raises(ValueError, match="modegpt cannot convert .*'lowrank'"):
        mc.convert(lowrank, "modegpt", CALIB, batch_size=4)
