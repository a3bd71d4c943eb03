"""Train-loop callbacks (``train.adapter_procedures.LoopCallbacks``) run by method name in
``train.finetune``: LoRA-SB and PiSSA start from the loaded base, LoKU starts from FILA and
trains with the inverted hinge loss, LoRAM trains on a pruned copy and saves the adapter
recovered for the original model. Every start is repeated on resume and by ``train.sample``
(the base digest in the checkpoint says it reproduced)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_testlib import forward, tiny_config

import models
from jaxattn import lowrank
from jaxattn.lowrank.loku import inverted_hinge_loss
from jaxattn.lowrank.loram import zero_pruned
from jaxattn.lowrank.methods.lorasb import first_update
from train import finetune, sample
from train.config import ConfigError
from train.data import make_loaders
from train.metrics import latest_rows, read_metrics
from train.optim import path_string

TOKENS = jnp.asarray(np.arange(24).reshape(2, 12) % 200, jnp.int32)


def _flat(params) -> dict:
    return {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _model(start: finetune.Start, config):
    model = finetune._model_fn(config, start.model_config)()
    nnx.update(model, jax.tree.map(jnp.asarray, start.params))
    return model


def _run_capturing_start(config, monkeypatch):
    """``finetune.run(config)`` and the ``Start`` it computed (no second start computed)."""
    starts = []
    real = finetune.start_params
    monkeypatch.setattr(finetune, "start_params", lambda c: starts.append(real(c)) or starts[-1])
    result = finetune.run(config)
    monkeypatch.setattr(finetune, "start_params", real)
    return result, starts[0]


def _base_model(run):
    model, _ = sample.load_model(str(run))
    return model


# slow tier: the default run keeps LoRA-SB's SVD-of-the-first-update init (test_lorasb.py
# test_noop_before_init_then_truncated_svd_of_first_update), its procedure by name
# (test_finetune_procedures) and the start-from-the-loaded-base path (the PiSSA case below)
@pytest.mark.slow
def test_lorasb_starts_from_the_svd_of_the_first_full_update(tiny_run, tmp_path):
    # LoRA-SB (PAPERS.md §7, faithful test): at init b·r·a is the best rank-k approximation of
    # ΔW₁ = −η·sign(G), G the base's gradient over the calibration batches (computed here
    # independently with jax.grad on the plain base model)
    options = ("rank=2", "lr=0.01", "targets=attn/q$")
    config = tiny_config(tmp_path / "sb", init_from=str(tiny_run), adapter="lorasb",
                         adapter_options=options)  # fmt: skip
    start = finetune.start_params(config)
    base = _base_model(tiny_run)
    loader = make_loaders(config)[0]
    batches = [loader.batch(i) for i in range(4)]
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)

    def nll(p, batch):
        logits = nnx.merge(graphdef, p, rest)(jnp.asarray(batch["inputs_BT"]))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        picked = jnp.take_along_axis(logp, jnp.asarray(batch["targets_BT"])[..., None], -1)
        w = jnp.asarray(batch["weights_BT"])
        return -jnp.sum(picked[..., 0] * w) / jnp.maximum(jnp.sum(w), 1.0)

    grad = jax.jit(jax.grad(nll))
    grads = [grad(params, b) for b in batches]
    flat = _flat(start.params)
    model = _model(start, config)
    for i in (0, 1):
        g = sum(np.asarray(gr["layers"][i]["attn"]["q"]["kernel"][...]) for gr in grads)
        upd = np.asarray(first_update(jnp.asarray(g), 0.01, "adam")).reshape(g.shape[0], -1)
        u, s, vh = np.linalg.svd(upd, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        lin = model.layers[i].attn.q
        delta = np.asarray(lin.adapter.delta_kernel(lin.kernel[...])).reshape(best.shape)
        np.testing.assert_allclose(delta, best, rtol=1e-4, atol=1e-6)
        assert np.any(flat[f"layers/{i}/attn/q/adapter/adapters/default/r"] != 0)


def test_pissa_by_name_rewrites_the_loaded_base_not_a_random_one(tiny_run, tmp_path):
    # PiSSA through train.finetune (refused before the callbacks): W_res + s·a·b == W of the
    # *loaded* base, so the model's output is unchanged at the start
    config = tiny_config(tmp_path / "pissa", init_from=str(tiny_run), adapter="lora",
                         adapter_options=("rank=2", "init=pissa", "targets=mlp/up$"))  # fmt: skip
    start = finetune.start_params(config)
    base = _base_model(tiny_run)
    model = _model(start, config)
    lin, ref = model.layers[0].mlp.up, base.layers[0].mlp.up
    w = np.asarray(ref.kernel[...])
    assert not np.allclose(np.asarray(lin.kernel[...]), w, atol=1e-3)  # the base was reduced
    np.testing.assert_allclose(np.asarray(lin.effective_kernel()), w, rtol=1e-5, atol=1e-5)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    delta = np.asarray(lin.adapter.delta_kernel(lin.kernel[...]))
    np.testing.assert_allclose(delta, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(forward(model, TOKENS), forward(base, TOKENS), atol=1e-4)


# slow tier: the default run keeps FILA and the IHL (test_loku.py), LoKU's procedure by name
# (test_finetune_procedures) and a callback start repeated by train.sample (PiSSA below)
@pytest.mark.slow
def test_loku_trains_with_the_inverted_hinge_loss_from_fila_and_resumes(
    tiny_run, tmp_path, monkeypatch
):
    options = ("rank=2", "fisher_batches=1", "retain_data=builtin", "targets=attn/(q|o)$")
    config = tiny_config(
        tmp_path / "loku", init_from=str(tiny_run), adapter="loku", adapter_options=options,
        steps=2, warmup_steps=1, async_checkpoint=False, lr=1e-2,
    )  # fmt: skip
    result, start = _run_capturing_start(config, monkeypatch)
    model, base = _model(start, config), _base_model(tiny_run)
    # FILA (LoKU eq. for ΔW*): the model is unchanged at init, the factors are not zero
    np.testing.assert_allclose(forward(model, TOKENS), forward(base, TOKENS), atol=1e-4)
    flat = _flat(start.params)
    assert np.any(flat["layers/0/attn/q/adapter/adapters/default/b"] != 0)
    # the first step's reported loss is the IHL (not the NLL) of the start model on batch 0
    batch = make_loaders(config)[0].batch(0)
    logits = forward(model, batch["inputs_BT"])
    ihl = float(jax.jit(inverted_hinge_loss)(logits, jnp.asarray(batch["targets_BT"]),
                                    jnp.asarray(batch["weights_BT"])))  # fmt: skip
    rows = latest_rows(read_metrics(os.path.join(config.out_dir, "metrics.jsonl")), "train")
    assert rows[0]["step"] == 1 and 0.0 <= rows[0]["loss"] <= 2.0
    np.testing.assert_allclose(rows[0]["loss"], ihl, rtol=1e-5)
    # train.sample (like a resumed run) repeats the start, FILA on the same data, and must find
    # the base digest the checkpoint recorded; the trained leaves come back bit for bit
    after = _flat(result.state["params"])
    tuned, _ = sample.load_model(config.out_dir)
    final = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(tuned, nnx.Param)))
    for key, x in _flat(final).items():
        assert np.array_equal(x, after[key]), key


@pytest.fixture(scope="module")
def gqa_base(tmp_path_factory):
    """A random llama-tiny-like GQA model (4 query heads, 2 kv heads) as a HF directory."""
    cfg = models.get_config("llama-tiny")
    import dataclasses

    cfg = dataclasses.replace(cfg, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=8, mlp_dim=64, vocab_size=256)  # fmt: skip
    path = str(tmp_path_factory.mktemp("gqa") / "hf")
    models.to_hf(models.DecoderLM(cfg, rngs=nnx.Rngs(3)), path)
    return path


# slow tier: the default run keeps LoRAM's exact recovery (test_loram.py) and its
# procedure by name (test_finetune_procedures)
@pytest.mark.slow
def test_loram_trains_on_the_pruned_copy_and_saves_it_recovered(gqa_base, tmp_path, monkeypatch):
    options = ("rank=2", "kv_keep=1", "mlp_keep=32", "targets=attn/(q|v)$|mlp/down$")
    config = tiny_config(
        tmp_path / "loram", init_from=gqa_base, adapter="loram", adapter_options=options,
        model_overrides=(), steps=2, warmup_steps=1, async_checkpoint=False, lr=1e-2,
    )  # fmt: skip
    result, start = _run_capturing_start(config, monkeypatch)
    c = result.trainer.model(jax.tree.map(np.asarray, result.state["params"]), result.rest).config
    assert (c.num_kv_heads, c.num_heads, c.mlp_dim) == (1, 2, 32)  # trained small
    small = result.trainer.model(jax.tree.map(np.asarray, result.state["params"]), result.rest)
    # LoRAM (PAPERS.md §7 faithful test): the saved adapter is for the original shapes; on the
    # kept coordinates its ΔW is the small model's, elsewhere 0, and the original model with
    # the pruned structures zeroed computes what the trained small model does
    full = models.from_hf(gqa_base)
    lowrank.load(full, os.path.join(config.out_dir, "adapter"))
    _, plan = start.token
    zero_pruned(full, plan)
    np.testing.assert_allclose(forward(full, TOKENS), forward(small, TOKENS),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    lin = full.layers[0].mlp.down
    delta = np.asarray(lin.adapter.delta_kernel(lin.kernel[...]))
    pruned = np.setdiff1d(np.arange(64), plan.mlp[0])
    assert np.all(delta[pruned] == 0) and np.any(delta[np.asarray(plan.mlp[0])] != 0)


def test_callback_option_errors_name_the_field(tiny_run, gqa_base, tmp_path):
    bad = tiny_config(tmp_path / "a", init_from=str(tiny_run), adapter="loku",
                      adapter_options=("retain_data=/no/such/file",))  # fmt: skip
    with pytest.raises(ConfigError, match=r"adapter.retain_data='/no/such/file'"):
        finetune.start_params(bad)
    mla = tiny_config(tmp_path / "b", init_from=str(tiny_run), adapter="loram",
                      adapter_options=("kv_keep=1",))  # fmt: skip
    with pytest.raises(ConfigError, match=r"adapter 'loram': LoRAM pruning needs attention='mha'"):
        finetune.start_params(mla)
    with pytest.raises(ConfigError, match=r"kv_keep=3 must be an int in \[1, 2\]"):
        finetune.start_params(tiny_config(tmp_path / "c", init_from=gqa_base, model_overrides=(),
                              adapter="loram", adapter_options=("kv_keep=3",)))  # fmt: skip
    with pytest.raises(ValueError, match=r"fisher_batches=0 must be an int >= 1"):
        lowrank.make_method("loku", fisher_batches=0).validate("x", models.DecoderLM(
            models.get_config("llama-tiny"), rngs=nnx.Rngs(0)).layers[0].attn.q)  # fmt: skip
