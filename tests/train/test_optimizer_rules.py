"""Optimizers by path (``train.optim``): rules parse and fail clearly, factories see each
parameter's shape, logical axes and fan-in, optimizer state is placed by shape, and frozen
parameters get no gradient, no state and no change."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from train_testlib import tiny_config

from jaxattn.sharding import make_mesh
from train.config import ConfigError
from train.data import make_loaders
from train.optim import parse_rule, path_string, register_optimizer
from train.pretrain import build_model
from train.step import make_trainer


def test_rules_parse_name_arguments_and_regex():
    rule = parse_rule("galore(rank=4, scale=0.5, projector='dct'):layers/(0|1)/mlp/")
    assert (rule.name, rule.kwargs, rule.pattern) == (
        "galore", {"rank": 4, "scale": 0.5, "projector": "dct"}, "layers/(0|1)/mlp/"
    )  # fmt: skip
    assert parse_rule("frozen:^embed/:x").pattern == "^embed/:x"  # the first colon splits
    for bad, message in {
        "adamw": "must look like name:regex",
        "adamw(4):.*": "arguments are not key=literal pairs",
        "adamw(lr=x):.*": "arguments are not key=literal pairs",
        "adamw(lr=1:.*": "unbalanced parentheses",
        "3adam:.*": "must look like name:regex",
    }.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_rule(bad)


def _trainer(tmp_path, rules, mesh=None, **changes):
    config = tiny_config(tmp_path, optimizer=tuple(rules), **changes)
    _, model_fn = build_model(config)
    mesh = mesh or make_mesh({"data": 1}, jax.devices()[:1])
    return config, make_trainer(model_fn, config, mesh)


def test_factories_receive_shape_logical_axes_and_fan_in(tmp_path):
    seen = {}

    def probe(params, config, *, tag):
        seen.update({p: (info, tag) for p, info in params.items()})
        return optax.sgd(config.lr)

    register_optimizer("probe", probe)
    _, trainer = _trainer(tmp_path, ["probe(tag='o'):attn/o/", "frozen:.*"])
    assert sorted(seen) == ["layers/0/attn/o/kernel", "layers/1/attn/o/kernel"]
    info, tag = seen["layers/1/attn/o/kernel"]
    assert tag == "o"
    assert info.shape == (2, 16, 64) and info.axes == ("heads", "head_dim", "embed")
    assert (info.fan_in_axes, info.fan_in) == (2, 32)  # [N, H] -> D: fan-in N * H
    assert trainer.trainable == set(seen)


def test_state_is_placed_like_its_parameter(tmp_path):
    """Adam moments take their parameter's sharding; GaLore's projectors and projected
    moments ([m, r], [r, n] under the path of a [m, n] kernel) keep the parameter's sharding
    of the dim they share with it (``jaxattn.optim.state_spec``), the rank dim replicated."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = ["galore(rank=4,update_proj_gap=2):mlp/up/", "adamw:.*"]
    _, trainer = _trainer(tmp_path, rules, mesh=mesh)
    params = {path_string(p): (x, s) for (p, x), s in zip(
        jax.tree_util.tree_leaves_with_path(trainer.abstract_state["params"]),
        jax.tree.leaves(trainer.state_shardings["params"]), strict=True)}  # fmt: skip
    opt = trainer.abstract_state["opt_state"]
    kinds = set()
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_leaves_with_path(opt),
        jax.tree.leaves(trainer.state_shardings["opt_state"]),
        strict=True,
    ):
        path = path_string(path)
        owner = next((k for k in params if path.endswith("/" + k)), None)
        if owner is None:
            assert sharding.spec == PartitionSpec(), path  # counts
            continue
        param, param_sharding = params[owner]
        if leaf.shape == param.shape:
            assert sharding == param_sharding, path
            kinds.add("like")
        else:  # [m, 4] or [4, n] of the [m, n] = [64, 128] kernel sharded (fsdp, tensor)
            assert param_sharding.spec == PartitionSpec("fsdp", "tensor"), param_sharding
            m, n = param.shape
            want = PartitionSpec("fsdp" if leaf.shape[0] == m else None,
                                 "tensor" if leaf.shape[1] == n else None)  # fmt: skip
            assert 4 in leaf.shape and sharding.spec == want, (path, leaf.shape, sharding)
            kinds.add("other shape")
    assert kinds == {"like", "other shape"}


def _dots(trainer, state, rest, batch) -> int:
    return trainer.train_step.lower(state, rest, batch).as_text().count("dot_general")


def test_frozen_leaves_get_no_gradient_no_state_and_stay_bit_identical(tmp_path):
    rules = ["frozen:^(?!layers/1/mlp/)", "adamw:.*"]  # train only the last MLP
    config, trainer = _trainer(tmp_path / "frozen", rules)
    _, full = _trainer(tmp_path / "full", ["adamw:.*"])
    state, rest = trainer.init()
    before = {path_string(p): np.asarray(x)
              for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}  # fmt: skip
    trained = {k for k in before if k.startswith("layers/1/mlp/")}
    assert trainer.trainable == trained
    opt_paths = [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    assert all(p.endswith(("count",)) or any(p.endswith(t) for t in trained) for p in opt_paths)
    assert sum(p.endswith("mu/layers/1/mlp/up/kernel") for p in opt_paths) == 1

    loader, _ = make_loaders(config)
    batch = trainer.put_batch(loader.batch(0))
    full_state, full_rest = full.init()
    # no weight gradient of a frozen matrix is computed: far fewer matmuls in the step
    frozen_dots, full_dots = (
        _dots(trainer, state, rest, batch),
        _dots(full, full_state, full_rest, batch),
    )
    assert frozen_dots < full_dots - 15, (frozen_dots, full_dots)
    for step in range(2):
        state, metrics = trainer.train_step(state, rest, trainer.put_batch(loader.batch(step)))
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    for path, x in jax.tree_util.tree_leaves_with_path(state["params"]):
        path = path_string(path)
        assert np.array_equal(np.asarray(x), before[path]) == (path not in trained), path


def test_galore_rule_runs_from_the_command_line(zygote, tmp_path):
    from train_testlib import set_args

    rules = "galore(rank=4,update_proj_gap=2,scale=1.0):mlp/,adamw:.*"
    run = tmp_path / "run"
    argv = set_args({"run_dir": str(run), "steps": 3, "warmup_steps": 1, "ckpt_every": 3,
                     "optimizer": rules})  # fmt: skip
    code, out = zygote.run(argv, tmp_path / "log")
    assert code == 0, out[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    saved = json.load(open(run / "config.json"))
    assert saved["optimizer"] == ["galore(rank=4,update_proj_gap=2,scale=1.0):mlp/", "adamw:.*"]


def test_optimizer_rules_change_the_meaning_of_a_run():
    from train.resume import HARMLESS_FIELDS

    assert "optimizer" not in HARMLESS_FIELDS
    assert tiny_config("x").optimizer == ("adamw:.*",)  # what training did before rules


def test_every_built_in_factory_updates_its_own_leaves():
    from train.config import TrainConfig
    from train.optim import ParamInfo, make_optimizer, registered_optimizers

    assert {"adamw", "lion", "sgd", "frozen", "galore", "fira"} <= set(registered_optimizers())
    shapes = {"a": (4, 3), "b": (3,), "c": (6, 4), "d": (2, 2), "e": (5, 5), "f": (3, 2)}
    infos = {k: ParamInfo(k, s, (None,) * len(s), min(len(s), 1)) for k, s in shapes.items()}
    rules = ("sgd(momentum=0.9):^a", "lion:^b", "fira(rank=2,update_proj_gap=1):^c",
             "adamw(lr=0.0):^d", "galore(rank=2,update_proj_gap=1):^e", "frozen:^f",
             "adamw:.*")  # a catch-all left with nothing to take is fine  # fmt: skip
    config = TrainConfig(optimizer=rules, warmup_steps=0)
    tx, trainable = make_optimizer(config, infos)
    assert trainable == set(shapes) - {"f"}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = {k: jax.random.normal(key, shapes[k]) for k, key in zip(sorted(trainable), keys)}
    grads = jax.tree.map(lambda p: p * 0.5 + 0.1, params)
    state = jax.jit(tx.init)(params)
    labels = {path_string(p).split("/")[2] for p, _ in jax.tree_util.tree_leaves_with_path(state)
              if path_string(p).startswith("1/inner_states/")}  # fmt: skip
    assert labels == {"rule0_sgd", "rule1_lion", "rule2_fira", "rule3_adamw", "rule4_galore"}
    updates, _ = jax.jit(tx.update)(grads, state, params)
    for key, u in updates.items():
        assert u.shape == shapes[key] and np.all(np.isfinite(u)), key
        assert np.any(u != 0) == (key != "d"), key  # adamw(lr=0.0) moves nothing
