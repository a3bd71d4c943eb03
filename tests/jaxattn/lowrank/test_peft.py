"""lowrank.from_peft / to_peft against the peft package (0.21.2, torch CPU, fp32).

Tiny random HF models (test_hf_parity's configs) x PEFT LoRA configs with non-zero factors
(several target sets and ranks, rank/alpha patterns, rsLoRA, DoRA, the LM head, DeepSeek's MLA
down/up projections): peft's ``save_pretrained`` -> ``from_peft`` on ``models.from_hf`` of the
same directory gives peft's logits (1e-4); trainable counts equal
``get_nb_trainable_parameters``; ``merge`` equals ``merge_and_unload``; adapters changed here ->
``to_peft`` -> ``PeftModel.from_pretrained`` loads every key (none missing or unexpected) and
gives our logits. Bad input (unsupported fields, kv_b_proj, shapes) raises naming it.
"""

import copy
import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jaxattn.lowrank as lr  # noqa: E402
import models  # noqa: E402
from jaxattn.layers import AdapterParam  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "models"))
from test_hf_parity import _hf_config  # noqa: E402

TOL = 1e-4
TOKENS = np.random.RandomState(0).randint(0, 97, (2, 9))

# (case id, arch, LoraConfig fields)
CASES = [
    (
        "llama_qkvo_regex_r4",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=r".*\.(q|k|v|o)_proj"),
    ),
    (
        "qwen2_mlp_patterns_rslora",
        "qwen2",
        dict(
            r=2,
            lora_alpha=5,
            use_rslora=True,
            target_modules=["gate_proj", "up_proj", "down_proj", "v_proj"],
            rank_pattern={"down_proj": 3, "layers.1.self_attn.v_proj": 5},
            alpha_pattern={"up_proj": 3.0},
        ),
    ),
    (
        "qwen2_bias_lora_only",
        "qwen2",
        dict(r=2, lora_alpha=4, bias="lora_only", target_modules=["q_proj", "v_proj", "o_proj"]),
    ),
    (
        "mistral_dora_head",
        "mistral",
        dict(
            r=3,
            lora_alpha=6,
            use_dora=True,
            target_modules=["q_proj", "o_proj", "down_proj", "lm_head"],
        ),
    ),
    (
        "deepseek_v3_mla",
        "deepseek_v3",
        dict(
            r=2,
            lora_alpha=4,
            use_dora=True,
            target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"],
        ),
    ),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """arch -> (HF model with random weights, its saved directory), built on first use."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(_hf_config(arch)).eval()
            with torch.no_grad():
                for n, p in hf.named_parameters():
                    p.copy_(torch.randn_like(p) * 0.15 + (1.0 if "norm" in n else 0.0))
            path = str(tmp_path_factory.mktemp(arch))
            hf.save_pretrained(path, safe_serialization=True)
            cache[arch] = (hf, path)
        return cache[arch]

    return get


def _peft_model(hf, fields, seed=1):
    """A PeftModel over a copy of ``hf`` with every LoRA factor (and magnitude) random, and
    (bias="lora_only") every trained bias moved."""
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**fields)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or (p.requires_grad and n.endswith("base_layer.bias")):
                noise = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(p + noise if "magnitude" in n or n.endswith("bias") else noise)
    return pm


def _logits_hf(m):
    with torch.no_grad():
        return m(torch.tensor(TOKENS)).logits.numpy()


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


# merge / unmerge in one compiled program per model structure (eagerly, every op compiles);
# they return how many paths they changed
_merge = nnx.jit(lambda model: len(lr.merge(model)))
_unmerge = nnx.jit(lambda model: len(lr.unmerge(model)))


@pytest.fixture(scope="module")
def loaded(bases, tmp_path_factory):
    """case id -> (peft model, its adapter dir, our model with the adapter from_peft'd)."""
    out = {}
    for cid, arch, fields in CASES:
        hf, base_dir = bases(arch)
        pm = _peft_model(hf, fields)
        d = str(tmp_path_factory.mktemp(cid))
        pm.save_pretrained(d)
        ours = models.from_hf(base_dir)
        lr.from_peft(ours, d)
        out[cid] = (pm, d, ours, base_dir)
    return out


IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("cid", IDS)
def test_from_peft_logits_and_counts(cid, loaded):
    pm, _, ours, _ = loaded[cid]
    want = _logits_hf(pm)
    got = np.asarray(_logits(ours, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    assert lr.trainable_count(ours) == pm.get_nb_trainable_parameters()[0]
    # the adapter changes the output: the comparison is not of two base models
    with pm.disable_adapter():
        base = _logits_hf(pm)
    assert np.abs(base - want).max() > 100 * TOL


@pytest.mark.parametrize("cid", IDS)
def test_merge_equals_merge_and_unload(cid, loaded):
    pm, _, ours, _ = loaded[cid]
    modules, _ = lr._peft._module_map(ours)
    merged = copy.deepcopy(pm).merge_and_unload()
    sd = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    assert int(_merge(ours)) > 0
    try:
        n = 0
        for mod, (_path, lin) in modules.items():
            if lin.adapter is None:
                continue
            k = np.asarray(lin.kernel[...]).reshape(lin.fan_in, lin.fan_out)
            np.testing.assert_allclose(k.T, sd[mod + ".weight"], rtol=1e-5, atol=1e-5)
            if lin.bias is not None:  # bias="lora_only": the trained bias folded in
                b = np.asarray(lin.bias[...]).reshape(-1)
                np.testing.assert_allclose(b, sd[mod + ".bias"], rtol=1e-6, atol=1e-6)
            n += 1
        assert n > 0
    finally:
        _unmerge(ours)


@pytest.mark.parametrize("cid", IDS)
def test_to_peft_loads_in_peft(cid, loaded, bases, tmp_path):
    _, _, fixture_model, base_dir = loaded[cid]
    arch = next(a for c, a, _ in CASES if c == cid)
    hf, _ = bases(arch)
    ours = nnx.clone(fixture_model)  # same structure: the jitted forward is reused
    # change every factor here (as training would), then export
    rng = np.random.RandomState(3)
    for _, var in nnx.to_flat_state(nnx.state(ours, AdapterParam)):
        noise = 0.1 * rng.randn(*var.shape).astype(np.float32)
        var[...] = jnp.asarray(np.asarray(var[...]) + noise)  # a device array: no scatter
    want = np.asarray(_logits(ours, jnp.asarray(TOKENS)))
    written = lr.to_peft(ours, str(tmp_path))
    assert written
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    from safetensors.numpy import load_file

    saved = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    expected = set(peft.get_peft_model_state_dict(back))
    assert saved == expected, (sorted(saved - expected), sorted(expected - saved))
    np.testing.assert_allclose(_logits_hf(back), want, rtol=TOL, atol=TOL)
    # and the written directory reads back here the same
    again = models.from_hf(base_dir)
    lr.from_peft(again, str(tmp_path))
    np.testing.assert_allclose(np.asarray(_logits(again, jnp.asarray(TOKENS))), want, atol=TOL)


def _edit(src, dst, **fields):
    shutil.copytree(src, dst)
    file = os.path.join(dst, "adapter_config.json")
    with open(file) as f:
        meta = json.load(f)
    meta.update(fields)
    with open(file, "w") as f:
        json.dump(meta, f)
    return dst


@pytest.mark.parametrize(
    "field,value",
    [
        ("bias", "all"),
        ("modules_to_save", ["lm_head"]),
        ("layers_to_transform", [0]),
        ("fan_in_fan_out", True),
        ("init_lora_weights", "pissa"),
        ("exclude_modules", ["v_proj"]),
        ("no_such_field", 1),
    ],
)
def test_unsupported_fields_are_named(field, value, loaded, tmp_path):
    _, d, _, base_dir = loaded["llama_qkvo_regex_r4"]
    bad = _edit(d, str(tmp_path / "bad"), **{field: value})
    with pytest.raises(ValueError, match=field):
        lr.from_peft(models.from_hf(base_dir), bad)


def test_kv_b_proj_refused_and_shape_mismatch(bases, loaded, tmp_path):
    hf, base_dir = bases("deepseek_v3")
    pm = _peft_model(hf, dict(r=2, target_modules=["kv_b_proj", "o_proj"]))
    pm.save_pretrained(str(tmp_path / "kvb"))
    with pytest.raises(ValueError, match=r"kv_b_proj.*k_b"):
        lr.from_peft(models.from_hf(base_dir), str(tmp_path / "kvb"))
    ours = models.from_hf(base_dir)
    lr.apply(ours, lr.AdapterConfig(targets=r"attn/k_b$", options={"rank": 2}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layers/0/attn/k_b: no Hugging Face module"):
        lr.to_peft(ours, str(tmp_path / "out"))
    # a llama adapter on the mistral model: every misshaped tensor is listed
    _, d, _, _ = loaded["llama_qkvo_regex_r4"]
    _, mistral_dir = bases("mistral")
    with pytest.raises(
        ValueError, match=r"(?s)q_proj.lora_B.weight: saved \(60, 4\), expected \(56, 4\).*layers.1"
    ):
        lr.from_peft(models.from_hf(mistral_dir), d)
    # rank in the file disagreeing with the config's r
    wrong_r = _edit(d, str(tmp_path / "r"), r=5)
    _, llama_dir = bases("llama")
    with pytest.raises(ValueError, match=r"lora_A.weight: saved \(4, 48\), expected \(5, 48\)"):
        lr.from_peft(models.from_hf(llama_dir), wrong_r)


def test_unsupported_adapters_refused(bases, tmp_path):
    hf, llama_dir = bases("llama")
    vera = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(r=4, target_modules=["q_proj"]))
    vera.save_pretrained(str(tmp_path / "vera"))
    with pytest.raises(ValueError, match=r"peft_type='VERA'"):
        lr.from_peft(models.from_hf(llama_dir), str(tmp_path / "vera"))
    ours = models.from_hf(llama_dir)
    lr.apply(
        ours,
        lr.AdapterConfig(targets=r"0/attn/q$", options={"rank": 2, "init": "pissa"}),
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match=r"layers/0/attn/q: init='pissa' rewrote the base"):
        lr.to_peft(ours, str(tmp_path / "pissa"))
    mixed = models.from_hf(llama_dir)
    cfg = lr.AdapterConfig(
        targets=r"attn/(q|v)$", options={"rank": 2}, overrides={r"attn/v$": {"use_rslora": True}}
    )
    lr.apply(mixed, cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"one use_rslora per adapter"):
        lr.to_peft(mixed, str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match=r"no projection holds an adapter named 'other'"):
        lr.to_peft(mixed, str(tmp_path / "none"), name="other")
    # a module that does not name its HF projections (jaxattn knows no model family)
    plain = nnx.Dict(q=mixed.layers[0].attn.q)
    with pytest.raises(ValueError, match=r"model must name its Hugging Face projections"):
        lr.to_peft(plain, str(tmp_path / "plain"))


def test_randlora_both_ways(bases, tmp_path):
    """peft RandLoRA (shared bases in the file, random λ and γ) -> from_peft: logits, counts,
    merge; then changed here -> to_peft -> peft loads every key and gives our logits."""
    hf, base_dir = bases("qwen2")
    cfg = peft.RandLoraConfig(
        r=8, randlora_alpha=24, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "randlora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "in"))
    ours = models.from_hf(base_dir)
    assert len(lr.from_peft(ours, str(tmp_path / "in"))) == 6
    want = _logits_hf(pm)
    with pm.disable_adapter():
        assert np.abs(_logits_hf(pm) - want).max() > 100 * TOL
    np.testing.assert_allclose(np.asarray(_logits(ours, jnp.asarray(TOKENS))), want, atol=TOL)
    assert lr.trainable_count(ours) == pm.get_nb_trainable_parameters()[0]
    sd = copy.deepcopy(pm).merge_and_unload().state_dict()
    modules, _ = lr._peft._module_map(ours)
    assert int(_merge(ours)) == 6
    for mod, (_path, lin) in modules.items():
        if lin.adapter is not None:
            k = np.asarray(lin.kernel[...]).reshape(lin.fan_in, lin.fan_out)
            np.testing.assert_allclose(k.T, sd[mod + ".weight"].numpy(), rtol=1e-5, atol=1e-5)
    _unmerge(ours)
    with pytest.raises(ValueError, match="to_peft"):
        lr.save(ours, str(tmp_path / "native"))
    rng = np.random.RandomState(4)
    for _, var in nnx.to_flat_state(nnx.state(ours, AdapterParam)):
        noise = 0.1 * rng.randn(*var.shape).astype(np.float32)
        var[...] = jnp.asarray(np.asarray(var[...]) + noise)  # a device array: no scatter
    mine = np.asarray(_logits(ours, jnp.asarray(TOKENS)))
    lr.to_peft(ours, str(tmp_path / "out"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "out")).eval()
    from safetensors.numpy import load_file

    saved = set(load_file(str(tmp_path / "out" / "adapter_model.safetensors")))
    assert saved == set(peft.get_peft_model_state_dict(back))
    np.testing.assert_allclose(_logits_hf(back), mine, atol=TOL)
    # a config r that disagrees with the saved λ, and an unsupported field, are named
    wrong = _edit(str(tmp_path / "in"), str(tmp_path / "wrong"), r=4)
    with pytest.raises(ValueError, match=r"randlora_lambda: saved \(8, 5\), expected \(4, 10\)"):
        lr.from_peft(models.from_hf(base_dir), wrong)
    drop = _edit(str(tmp_path / "in"), str(tmp_path / "drop"), randlora_dropout=0.1)
    with pytest.raises(ValueError, match="randlora_dropout"):
        lr.from_peft(models.from_hf(base_dir), drop)
    # a native RandLoRA (per-path bases from a key) has no PEFT form
    native = models.from_hf(base_dir)
    lr.apply(
        native, lr.AdapterConfig("randlora", {"rank": 4}, targets=r"attn/q$"), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="RandLoRA adapters read by from_peft"):
        lr.to_peft(native, str(tmp_path / "native2"))
