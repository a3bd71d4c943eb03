"""``AdapterConfig(bias="lora_only")``: the bias of every adapted projection trains as a change
db that belongs to the adapter (y = x·W + b + delta(x) + db): the forward equals the base with
bias b + db plus the same adapter without bias; ``disabled`` gives the base exactly; ``merge``
folds db into the bias and ``unmerge`` takes it out; ``save``/``load`` and ``to_hf`` carry it;
``trainable_count`` counts it (as PEFT's ``get_nb_trainable_parameters`` counts the biases);
``to_peft`` writes it as peft's ``bias="lora_only"``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as L
from jaxattn.layers import AdapterParam
from models import DecoderLM, from_hf, get_config, to_hf

TOK = np.random.default_rng(1).integers(0, 256, (2, 8)).astype(np.int32)  # numpy: no compile
TARGETS = r"attn/(q|v|o)$"  # q, v have biases in Qwen2; o has none


@nnx.jit
def _model():
    """The model, initialised in one compiled program (eagerly, every op compiles); the same
    parameters as the eager build."""
    return DecoderLM(get_config("qwen2-tiny"), rngs=nnx.Rngs(0))


@nnx.jit
def _logits(model, tokens_BT):
    """The model's logits in one compiled program (eager calls compile every op)."""
    return model(tokens_BT)


def _adapted(bias="lora_only", seed=3):
    m = _model()
    cfg = L.AdapterConfig(options=dict(rank=2), targets=TARGETS, bias=bias)
    paths = []

    @nnx.jit
    def adapt(m):  # apply + numpy-drawn b and db in one compiled program; paths recorded
        paths.extend(L.apply(m, cfg, rngs=nnx.Rngs(seed)))
        rng_b, rng_db = np.random.default_rng(seed), np.random.default_rng(seed + 1000)
        for p in paths:
            s = L.linear_paths(m)[p].adapter
            b = s.adapters["default"].b
            b[...] = jnp.asarray(0.05 * rng_b.standard_normal(b.shape, np.float32))
            if "default" in s.bias_deltas:
                db = s.bias_deltas["default"]
                db[...] = jnp.asarray(0.1 * rng_db.standard_normal(db.shape, np.float32))

    adapt(m)
    return m, paths


def test_forward_is_base_with_shifted_bias_plus_the_adapter():
    m, paths = _adapted()
    lin = L.linear_paths(m)
    with_db = sorted(p for p in paths if "default" in lin[p].adapter.bias_deltas)
    assert with_db == ["layers/0/attn/q", "layers/0/attn/v", "layers/1/attn/q", "layers/1/attn/v"]
    ref, _ = _adapted(bias="none")  # same seeds: the same factors
    ref_lin = L.linear_paths(ref)
    for p in with_db:
        db = lin[p].adapter.bias_deltas["default"][...]
        ref_lin[p].bias[...] = lin[p].bias[...] + db
    np.testing.assert_allclose(_logits(m, TOK), _logits(ref, TOK), rtol=1e-5, atol=1e-5)
    base = _logits(_model(), TOK)
    with L.disabled(m):
        np.testing.assert_array_equal(np.asarray(_logits(m, TOK)), np.asarray(base))
    lora_only = sum(x.size for x in jax.tree.leaves(nnx.state(ref, AdapterParam)))
    biases = sum(lin[p].bias.size for p in with_db)
    assert L.trainable_count(m) == lora_only + biases


def test_gradient_reaches_the_bias_change():
    m, _ = _adapted()

    def loss(model):
        return jnp.mean(model(TOK) ** 2)

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam)))(m)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    db = [k for k in flat if "bias_deltas" in k]
    assert len(db) == 4 and all(np.abs(np.asarray(flat[k][...])).max() > 0 for k in db)


def test_merge_folds_the_bias_and_unmerge_restores_it():
    m, paths = _adapted()
    want = np.asarray(_logits(m, TOK))
    lin = L.linear_paths(m)
    b0 = {p: np.asarray(lin[p].bias[...]) for p in paths if lin[p].bias is not None}
    db = {p: np.asarray(lin[p].adapter.bias_deltas["default"][...]) for p in b0}
    nnx.jit(lambda m: (L.merge(m), None)[1])(m)  # in one compiled program
    np.testing.assert_allclose(np.asarray(_logits(m, TOK)), want, rtol=1e-5, atol=1e-5)
    for p in b0:
        np.testing.assert_allclose(np.asarray(lin[p].bias[...]), b0[p] + db[p], atol=1e-7)
    nnx.jit(lambda m: (L.unmerge(m), None)[1])(m)
    for p in b0:
        np.testing.assert_allclose(np.asarray(lin[p].bias[...]), b0[p], atol=1e-6)
    np.testing.assert_allclose(np.asarray(_logits(m, TOK)), want, rtol=1e-5, atol=1e-5)


def test_save_load_and_hf_export_carry_the_bias(tmp_path):
    m, _ = _adapted()
    want = np.asarray(_logits(m, TOK))
    L.save(m, str(tmp_path / "ad"))
    fresh = _model()
    L.load(fresh, str(tmp_path / "ad"))
    np.testing.assert_allclose(np.asarray(_logits(fresh, TOK)), want, rtol=1e-6, atol=1e-6)
    to_hf(m, str(tmp_path / "hf"))  # adapters and bias changes folded in
    np.testing.assert_allclose(np.asarray(_logits(from_hf(str(tmp_path / "hf")), TOK)), want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("bias, match", [("all", "PEFT's 'all'"), ("some", "must be one of")])
def test_bad_bias_mode(bias, match):
    with pytest.raises(ValueError, match=match):
        L.apply(_model(), L.AdapterConfig(options=dict(rank=2), bias=bias), rngs=nnx.Rngs(0))


def test_to_peft_writes_the_trained_bias_and_refuses_a_partial_one(tmp_path):
    # peft's bias="lora_only" saves the trained bias b + db of each adapted module with a bias
    # (tests/jaxattn/lowrank/test_peft.py loads it in peft); a bias trained on only some of the
    # adapted projections has no peft form
    import json

    from safetensors.numpy import load_file

    m, _ = _adapted()
    written = L.to_peft(m, str(tmp_path / "p"))
    assert "model.layers.0.self_attn.q_proj" in written
    with open(tmp_path / "p" / "adapter_config.json") as f:
        assert json.load(f)["bias"] == "lora_only"
    saved = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    q = L.linear_paths(m)["layers/0/attn/q"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
    want = np.asarray(q.bias[...]) + np.asarray(q.adapter.bias_deltas["default"][...])
    np.testing.assert_allclose(saved[key], want.reshape(-1), rtol=1e-6)
    assert not any(k.endswith("o_proj.base_layer.bias") for k in saved)  # o has no bias
    del L.linear_paths(m)["layers/0/attn/v"].adapter.bias_deltas["default"]
    with pytest.raises(ValueError, match="only .* of .* train it"):
        L.to_peft(m, str(tmp_path / "partial"))
