"""TransMLA on whole models (PAPERS.md §2): tiny random HF Llama (GQA) and Qwen2 (MQA, q/k/v
biases) saved as safetensors, loaded by ``models.from_hf``, converted by ``models.convert``.

Faithful tests: the exact step reproduces the torch logits (1e-4, fp32) with GQA's cache bytes;
the RoPE step is exact when no rotation is dropped (K = 1); full-rank PCA is exact; absorbed
latent decoding == the forward; the final model exports as DeepSeek-V3 that transformers loads
with equal logits; the formats' limits and bad input raise named errors.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import models  # noqa: E402
from models import convert as mc  # noqa: E402

VOCAB, TOL = 97, 1e-4
RNG = np.random.default_rng(0)
CALIB = RNG.integers(0, VOCAB, (16, 24))
PROBE = CALIB[:4]


def _hf(arch: str):
    common = dict(
        vocab_size=VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=64,
        attn_implementation="eager",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        head_dim=16,
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(num_key_value_heads=2, **common)
        )
    else:  # MQA with q/k/v biases
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(num_key_value_heads=1, **common)
        )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # biases too (HF zero-inits them)
            p.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{arch: (directory, torch logits on PROBE)}."""
    out = {}
    for arch in ("llama", "qwen2"):
        path = str(tmp_path_factory.mktemp(arch))
        model = _hf(arch)
        model.save_pretrained(path, safe_serialization=True)
        with torch.no_grad():
            out[arch] = (path, model(torch.tensor(PROBE)).logits.numpy())
    return out


def _logits(model, tokens=PROBE):
    return mc.logits(model, tokens)  # jitted: one compile per model structure and shape


def _decode_matches_forward(model):
    from flax import nnx

    x = jnp.asarray(CALIB[:2, :12])
    decode = nnx.jit(lambda m, tok, cache: m.decode(tok, cache))
    logits, cache = decode(model, x[:, :5], model.init_cache(2, 16, jnp.float32))  # prefill
    steps = [np.asarray(logits)]
    for t in range(5, 12):  # then one token at a time
        logits, cache = decode(model, x[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), _logits(model, x), atol=TOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_step_matches_torch_with_gqa_cache_bytes(hf_dirs, arch):
    path, ref = hf_dirs[arch]
    gqa = models.from_hf(path)
    mla, reports = mc.transmla(gqa, steps=("exact",))
    a = gqa.config.layer_attention_config(0)
    m = mla.config.layer_attention_config(0)
    assert (m.qk_rope_head_dim, m.rope_block_dim, m.kv_lora_rank) == (
        a.n_kv * a.h,
        a.h,
        a.n_kv * a.v,
    )
    assert (m.qk_nope_head_dim, m.kv_norm, m.q_bias) == (0, False, arch == "qwen2")
    np.testing.assert_allclose(_logits(mla), ref, atol=TOL)
    assert (
        mla.cache_bytes_per_token()
        == gqa.cache_bytes_per_token()
        == reports[0]["cache_bytes_per_token"]
    )
    if arch == "qwen2":  # the exact form (nope 0, block rope, biases, no norm) decodes absorbed
        _decode_matches_forward(mla)
    with pytest.raises(ValueError, match="kv_norm=False.*rope_block_dim"):
        models.to_hf(mla, "/nonexistent/never-written")


def test_rope_step_and_full_rank_pca_are_exact_without_dropped_rotation(hf_dirs):
    # MQA: one kv head, so RoRoPE keeps every rotated dim; L = K·(H+V) - P = 16 is full rank
    path, ref = hf_dirs["qwen2"]
    gqa = models.from_hf(path)
    mla, reports = mc.transmla(gqa, CALIB, steps=("exact", "rope", "compress"), kv_lora_rank=16)
    assert [r["step"] for r in reports] == ["exact", "rope", "compress"]
    assert reports[1]["discarded_rope_energy"] == pytest.approx(0.0, abs=1e-12)
    assert reports[1]["q_factor_residual"] == pytest.approx(0.0, abs=1e-12)
    assert reports[2]["discarded_latent_energy"] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(_logits(mla), ref, atol=TOL)
    assert mla.cache_bytes_per_token() == gqa.cache_bytes_per_token()
    with pytest.raises(ValueError, match="q_bias"):
        models.to_hf(mla, "/nonexistent/never-written")


@pytest.fixture(scope="module")
def llama_converted(hf_dirs):
    """Llama through every step: rope_dim 8 (collapse 2), freqfold 4, kv_lora_rank 24."""
    gqa = models.from_hf(hf_dirs["llama"][0])
    mla, reports = mc.transmla(gqa, CALIB, rope_dim=8, freqfold=4, kv_lora_rank=24, batch_size=4)
    return gqa, mla, reports


def test_every_step_reports_its_error(llama_converted):
    gqa, mla, reports = llama_converted
    assert [r["step"] for r in reports] == ["exact", "rope", "compress", "norm"]
    bytes_gqa = gqa.cache_bytes_per_token()
    assert [r["cache_bytes_per_token"] for r in reports] == [bytes_gqa, bytes_gqa, 256, 256]
    assert reports[0]["max_abs_logit_diff"] < TOL
    assert 0 < reports[1]["discarded_rope_energy"] < 1  # 2 heads: half the rotations go
    assert (reports[1]["collapse"], reports[1]["freqfold"]) == (2, 4)
    assert reports[1]["q_factor_residual"] < 1e-12  # each head's query is rank H: exact factor
    assert 0 < reports[2]["discarded_latent_energy"] < 1
    assert 0 < reports[3]["latent_norm_residual"] < 1
    for r in reports[1:]:
        assert np.isfinite(r["max_abs_logit_diff"])
    c = mla.config.layer_attention_config(0)
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.kv_norm) == (24, 8, 16, True)


def test_converted_model_decodes_absorbed_and_exports_to_deepseek_v3(llama_converted, tmp_path):
    _, mla, _ = llama_converted
    _decode_matches_forward(mla)
    models.to_hf(mla, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager"
    )
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        ref = hf(torch.tensor(PROBE)).logits.numpy()
    np.testing.assert_allclose(_logits(mla), ref, atol=TOL)


def test_converted_latent_up_projections_train_and_the_cache_stays(llama_converted):
    from flax import nnx

    _, mla, _ = llama_converted
    x = jnp.asarray(CALIB[:2, :16])

    def loss(m):
        logp = jax.nn.log_softmax(m(x[:, :-1]), axis=-1)
        return -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1).mean()

    grads = nnx.jit(nnx.grad(loss))(mla)
    for name in ("k_b", "v_b", "kv_a", "kv_norm"):
        g = getattr(grads.layers[0].attn, name)
        leaf = g.kernel if name != "kv_norm" else g.scale
        assert np.isfinite(leaf[...]).all() and np.abs(leaf[...]).max() > 0, name
    assert mla.cache_bytes_per_token() == 256


def _model(**kw):
    from flax import nnx

    cfg = dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=48)
    # abstract: the checks run on the config before any array is touched
    return nnx.eval_shape(
        lambda: models.DecoderLM(models.ModelConfig(**(cfg | kw)), rngs=nnx.Rngs(0))
    )


@pytest.mark.parametrize(
    "kw, options, match",
    [
        (dict(sliding_window=8, arch="mistral"), {}, "sliding_window=8"),
        (dict(qk_norm=True), {}, "qk_norm=True"),
        (
            dict(
                attention="mla",
                num_kv_heads=None,
                kv_lora_rank=8,
                qk_nope_head_dim=4,
                qk_rope_head_dim=4,
                v_head_dim=4,
            ),
            {},
            "kind is 'mla'",
        ),
        ({}, dict(kv_lora_rank=40), r"kv_lora_rank=40 must be an int in \[1, 24\]"),
        ({}, dict(kv_lora_rank=0), "kv_lora_rank=0"),
        ({}, dict(steps=("rope",)), "from 'exact'"),
    ],
)
def test_bad_input_is_named(kw, options, match):
    with pytest.raises(ValueError, match=match):
        mc.transmla(_model(**kw), CALIB, **options)


def test_too_little_calibration_and_unknown_methods_are_named():
    model = _model()
    with pytest.raises(ValueError, match="fewer than kv_lora_rank=20"):
        mc.transmla(model, CALIB[:2, :8], kv_lora_rank=20, batch_size=2)
    with pytest.raises(ValueError, match="need calibration tokens"):
        mc.transmla(model, None)
    with pytest.raises(ValueError, match="unknown conversion method 'modegtp'.*modegpt"):
        mc.convert(model, "modegtp", CALIB)  # modegpt is a method now; a misspelling is not
    with pytest.raises(ValueError, match="no options \\['rank'\\]"):
        mc.convert(model, "transmla", CALIB, rank=3)
    with pytest.raises(ValueError, match="freqfold=3"):
        mc.transmla(model, CALIB, freqfold=3)


@pytest.mark.slow  # the CLI on transmla's four steps; default: test_cli_on_kv_heads (main's
# table, options and errors) and test_every_step_reports_its_error (the transmla path)
def test_cli_prints_the_before_after_table(hf_dirs, tmp_path, capsys):
    out = str(tmp_path / "mla")
    args = ["--from", hf_dirs["llama"][0], "--to", out, "--method", "transmla"]
    args += ["--set", "kv_lora_rank=24", "--calib-rows", "8", "--eval-rows", "4", "--seq-len", "32"]
    mc.main(args)
    text = capsys.readouterr().out
    for row in ("parameters", "cache bytes / token", "eval perplexity", "time (s)", "step norm:"):
        assert row in text
    # 2 layers of fp32: GQA 2·(16+16) numbers -> MLA 24 latent + 16 rope key
    assert [ln.split()[-2:] for ln in text.splitlines() if ln.startswith("cache")] == [
        ["512", "320"]
    ]
    assert models.from_hf(out).config.arch == "deepseek_v3"
    with pytest.raises(SystemExit):
        mc.main(args[:5] + ["bogus", "--set", "kv_lora_rank=24"])
    assert "unknown method 'bogus'" in capsys.readouterr().err


def test_cli_on_kv_heads(hf_dirs, tmp_path, capsys):
    out = str(tmp_path / "mqa")
    args = ["--from", hf_dirs["llama"][0], "--to", out, "--method", "kv_heads"]
    args += ["--set", "num_kv_heads=1", "--calib-rows", "8", "--eval-rows", "2", "--seq-len", "16"]
    mc.main(args)
    text = capsys.readouterr().out
    for row in ("parameters", "cache bytes / token", "eval perplexity", "step kv_heads:"):
        assert row in text
    # 2 layers of fp32: 2 kv heads of 16 + 16 numbers -> 1
    assert [ln.split()[-2:] for ln in text.splitlines() if ln.startswith("cache")] == [
        ["512", "256"]
    ]
    assert models.from_hf(out).config.num_kv_heads == 1
    with pytest.raises(SystemExit):
        mc.main(args[:5] + ["bogus"])
    assert "unknown method 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mc.main(args[:7] + ["num_kv_heads"])  # --set without "="
    assert "expected key=value" in capsys.readouterr().err


def test_kv_heads_merges_to_standard_gqa_that_hf_loads(hf_dirs, tmp_path):
    path, ref = hf_dirs["llama"]
    gqa = models.from_hf(path)
    same, (report,) = mc.convert(gqa, "kv_heads", CALIB, num_kv_heads=2, batch_size=4)
    np.testing.assert_allclose(_logits(same), ref, atol=TOL)  # group size 1: exact
    mqa, (report,) = mc.convert(gqa, "kv_heads", CALIB, num_kv_heads=1, batch_size=4)
    assert mqa.config.num_kv_heads == 1 and mqa.config.arch == "llama"
    assert report["cache_bytes_per_token"] == gqa.cache_bytes_per_token() // 2
    assert 0 < report["key_error"] <= report["key_error_meanpool"]
    assert 0 < report["value_error"] <= report["value_error_meanpool"]
    models.to_hf(mqa, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager"
    )
    assert hf.config.num_key_value_heads == 1
    with torch.no_grad():
        np.testing.assert_allclose(_logits(mqa), hf(torch.tensor(PROBE)).logits.numpy(), atol=TOL)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide"):
        mc.kv_heads(gqa, CALIB, num_kv_heads=3)


def test_auto_freqfold_keeps_the_search_best(hf_dirs):
    gqa = models.from_hf(hf_dirs["llama"][0])
    auto, reports = mc.transmla(gqa, CALIB, steps=("exact", "rope"), freqfold="auto", batch_size=4)
    fixed, _ = mc.transmla(gqa, CALIB, steps=("exact", "rope"), freqfold=1, batch_size=4)
    assert reports[1]["freqfold"] in (1, 2, 4, 8)
    assert mc._nll(auto, CALIB[:4]) <= mc._nll(fixed, CALIB[:4]) + 1e-6  # 1 is tried first
