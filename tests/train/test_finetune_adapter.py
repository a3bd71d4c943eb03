"""``train.finetune --adapter METHOD --set adapter.FIELD=VALUE``: the adapter is part of the run's
config; only its leaves train (base bit-identical), fine-tuning checkpoints hold them alone
and resume exactly, ``train.sample`` rebuilds the adapter from the run, and the adapter written
alone to ``<run>/adapter`` reloads onto the base with the same logits."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_testlib import forward, tiny_config

from jaxattn import lowrank
from train import finetune, sample
from train.adapters import ADAPTER_RULES, adapter_config, adapter_rules
from train.checkpoints import read_meta
from train.config import ConfigError, TrainConfig, config_from_argv
from train.optim import path_string


def _flat(params) -> dict:
    return {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_cli_flags_become_the_adapter_config():
    config = config_from_argv(
        ["--adapter", "lora", "--set", "adapter.rank=4", "--set", "adapter.alpha=8",
         "--set", "adapter.use_rslora=true", "--set", "adapter.targets=attn/(q|v)$"]
    )  # fmt: skip
    assert config.adapter == "lora"
    assert config.adapter_options == ("rank=4", "alpha=8", "use_rslora=true", "targets=attn/(q|v)$")
    cfg = adapter_config(config)
    assert cfg.method == "lora" and cfg.targets == "attn/(q|v)$"
    assert cfg.options == {"rank": 4, "alpha": 8.0, "use_rslora": True}
    assert type(cfg.options["rank"]) is int


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(adapter="lorax"), "unknown adapter method 'lorax'.*did you mean"),
        (dict(adapter="lora", adapter_options=("ranks=4",)), "no option 'ranks'.*rank"),
        (dict(adapter="lora", adapter_options=("rank=four",)), r"adapter\.rank='four'"),
        (dict(adapter="lora", adapter_options=("rank=2", "rank=3")), "'rank' is given twice"),
        (dict(adapter_options=("rank=2",)), "without --adapter"),
    ],
)
def test_bad_adapter_options_are_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        adapter_config(TrainConfig(**changes))


def test_pretraining_refuses_an_adapter(tmp_path):
    from train import pretrain

    with pytest.raises(ConfigError, match="attached by train.finetune"):
        pretrain.run(tiny_config(tmp_path, adapter="lora"))


def test_lora_finetune_trains_adapters_only_resumes_and_samples(tiny_run, tmp_path):
    options = ("rank=2", "alpha=4", "targets=attn/q$|mlp/(gate|down)$")
    changes = dict(steps=4, warmup_steps=1, ckpt_every=2, async_checkpoint=False, lr=1e-2)
    config = tiny_config(
        tmp_path / "ft", init_from=str(tiny_run), adapter="lora", adapter_options=options,
        **changes,
    )  # fmt: skip
    straight = finetune.run(config)
    _, base = finetune.load_init(str(tiny_run))
    base, after = _flat(base), _flat(straight.state["params"])
    adapters = sorted(set(after) - set(base))
    want = [f"layers/{i}/{m}/adapter/adapters/default/{f}" for i in (0, 1)
            for m in ("attn/q", "mlp/down", "mlp/gate") for f in "ab"]  # fmt: skip
    assert adapters == sorted(want)
    for key in base:  # every base leaf frozen, bit for bit
        assert np.array_equal(after[key], base[key]), key
    assert all(np.any(after[k] != 0) for k in adapters if k.endswith("/b"))  # B left zero init

    meta = read_meta(os.path.join(config.out_dir, "checkpoints"), 4)
    assert sorted(meta["leaf_checksums"]["params"]) == adapters  # the adapter alone is saved
    assert tuple(meta["config"]["optimizer"]) == ADAPTER_RULES

    shutil.rmtree(os.path.join(config.out_dir, "checkpoints", "4"))
    resumed = finetune.run(config)
    assert resumed.start_step == 2
    for key, x in _flat(resumed.state["params"]).items():
        assert np.array_equal(x, after[key]), key

    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % 200, jnp.int32)
    tuned, _ = sample.load_model(config.out_dir)  # rebuilt with the run's adapter
    want_logits = forward(tuned, tokens)
    plain, _ = sample.load_model(str(tiny_run))
    assert not np.allclose(forward(plain, tokens), want_logits, atol=1e-4)
    lowrank.load(plain, os.path.join(config.out_dir, "adapter"))  # the adapter written alone
    np.testing.assert_allclose(forward(plain, tokens), want_logits, rtol=1e-5, atol=1e-5)


def test_sample_cli_attaches_an_adapter_dir(tiny_run, tmp_path, capsys):
    model, _ = sample.load_model(str(tiny_run))
    cfg = lowrank.AdapterConfig(options={"rank": 2}, targets="attn/v_b$")
    lowrank.apply(model, cfg, rngs=nnx.Rngs(1))
    lowrank.save(model, str(tmp_path / "ad"))
    sample.main(["--checkpoint", str(tiny_run), "--prompt", "ab", "--max-new-tokens", "3",
                 "--adapter", str(tmp_path / "ad")])  # fmt: skip
    assert capsys.readouterr().out.startswith("checkpoint step 4")
    with pytest.raises(SystemExit):
        sample.main(["--checkpoint", str(tiny_run), "--prompt", "ab", "--adapter", str(tmp_path)])
    assert "holds no adapter_config.json" in capsys.readouterr().err


# slow tier: the default run keeps SoRA's proximal step (test_sora.py) and its procedure by
# name (test_finetune_procedures.test_each_method_names_a_procedure_the_optimizer_builds)
@pytest.mark.slow
def test_sora_finetune_runs_its_proximal_gate_step_by_name(tiny_run, tmp_path):
    # SoRA's training procedure comes with the method: --adapter sora trains with the rule
    # of SoRAConfig.training_rules (AdamW + the proximal L1 step on the gates, threshold
    # λ·η(t)). With λ·η ≥ 1 per step the gates (init 1) are driven to exactly 0.
    options = ("rank=2", "lam=200", "targets=attn/q$")
    config = tiny_config(
        tmp_path / "sora", init_from=str(tiny_run), adapter="sora", adapter_options=options,
        steps=3, warmup_steps=1, ckpt_every=3, async_checkpoint=False, lr=1e-2,
    )  # fmt: skip
    assert adapter_rules(config) == ("sora(lam=200.0):/adapter/", "frozen:.*")
    result = finetune.run(config)
    after = _flat(result.state["params"])
    gates = {k: v for k, v in after.items() if k.endswith("/adapter/adapters/default/gate")}
    assert sorted(gates) == [f"layers/{i}/attn/q/adapter/adapters/default/gate" for i in (0, 1)]
    for key, gate in gates.items():
        assert np.array_equal(gate, np.zeros(2)), (key, gate)
    assert all(np.any(after[k.replace("/gate", "/a")] != 0) for k in gates)
    meta = read_meta(os.path.join(config.out_dir, "checkpoints"), 3)
    assert tuple(meta["config"]["optimizer"])[0] == "sora(lam=200.0):/adapter/"
