"""Checkpoint integrity: per-leaf checksums see every changed element on any sharding; a
corrupted checkpoint is refused by every reader (restore_params, ``train.sample``,
``train.finetune``) naming the step directory, and the parameter when the files still decode;
pretraining skips it in place and resumes from the step before; checkpoints written before
per-leaf checksums still load and are verified."""

from __future__ import annotations

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_STEPS
from train_testlib import (
    abstract_params,
    flip_bytes,
    largest_file,
    set_args,
    tiny_config,
)

from jaxattn.sharding import make_mesh
from train import finetune, integrity, sample
from train.checkpoints import Checkpointer, restore_params
from train.integrity import ALGORITHM, CheckpointError, leaf_checksums, legacy_checksum
from train.optim import path_string
from train.pretrain import build_model
from train.step import make_trainer


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_leaf_checksums_see_every_single_element_change(dtype):
    x = (jnp.arange(37 * 3) % 7).reshape(37, 3).astype(dtype)
    base, _ = leaf_checksums({"a": x, "b": x})
    bits = 1 if dtype == jnp.bool_ else jnp.dtype(dtype).itemsize * 8
    for index in [(0, 0), (1, 0), (17, 2), (36, 2)]:  # even and odd flat positions
        for bit in sorted({0, bits // 2, bits - 1}):  # the sign bit included
            raw = np.asarray(x).copy()
            view = raw.view(np.uint8 if bits <= 8 else {16: np.uint16, 32: np.uint32}[bits])
            view[index] ^= view.dtype.type(1 << bit)
            got, _ = leaf_checksums({"a": x, "b": jnp.asarray(raw)})
            assert got["a"] == base["a"] and got["b"] != base["b"], (index, bit)
    swapped = jnp.asarray(np.asarray(x)[::-1])
    assert leaf_checksums({"a": swapped})[0]["a"] != base["a"] or dtype == jnp.bool_


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8, jnp.int8, jnp.bool_]
)
def test_host_digest_of_small_leaves_equals_the_device_digest(dtype):
    # small one-device leaves are digested in numpy (no compile per shape): same ALGORITHM bits
    rng = np.random.default_rng(1)
    for shape in [(), (5,), (37, 3), (2, 3, 4)]:
        x = np.asarray(jnp.asarray(rng.standard_normal(shape) * 9).astype(dtype))
        host = integrity._host_digest(x)
        device = jax.device_get(integrity._leaf_digest(jnp.asarray(x)))
        assert np.array_equal(host[0], device[0]) and bool(host[1]) == bool(device[1]), shape
    if jnp.issubdtype(dtype, jnp.inexact):
        bad = np.asarray(jnp.ones((3, 3), dtype).at[1, 2].set(jnp.inf))
        assert not integrity._host_digest(bad)[1]


def test_leaf_checksums_do_not_depend_on_the_sharding():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = jax.random.normal(jax.random.key(0), (64, 48))
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    assert len(sharded.sharding.device_set) == 8
    assert leaf_checksums({"w": x}) == leaf_checksums({"w": sharded})
    assert not leaf_checksums({"w": x.at[3, 3].set(jnp.nan)})[1]["w"]


def _copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_flipped_bytes_are_refused_by_every_reader(tiny_run, zygote, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    step_dir = run / "checkpoints" / "4"
    flip_bytes(largest_file(step_dir / "params"))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(step_dir))}: "):
        restore_params(str(run / "checkpoints"), abstract_params())
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and err[0].startswith("checkpoint error: ")
    assert str(step_dir) in err[0] and "TensorStore(" not in err[0]
    with pytest.raises(SystemExit) as exit_:
        finetune.main(set_args({"init_from": str(run), "run_dir": str(tmp_path / "ft")}))
    assert exit_.value.code == 1 and str(step_dir) in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()
    # pretraining skips it in place (one line saying why), resumes from step 2, and keeps it
    corrupt = {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    code, out = zygote.run(set_args(TINY_STEPS | {"run_dir": str(run)}), tmp_path / "log")
    assert code == 0, out[-3000:]
    warning = next(line for line in out.splitlines() if "is unusable" in line)
    assert f"checkpoint step 4 in {run / 'checkpoints'} is unusable (" in warning
    assert "TensorStore(" not in warning and "resumed at step 2" in out
    kept = run / "checkpoints" / "4.corrupt-0"
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == corrupt
    params, meta = restore_params(str(run / "checkpoints"), abstract_params())
    assert meta["step"] == 4


def test_a_changed_parameter_is_named(tiny_run, tmp_path, capsys):
    """Files that still decode but hold other values than were saved: the reader names the
    parameter (and only it) and the step directory."""
    run = _copy(tiny_run, tmp_path)
    ckpt_dir = run / "checkpoints"
    params, _ = restore_params(str(ckpt_dir), abstract_params())
    paths = [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    target = next(p for p in sorted(paths) if p.startswith("layers/0/"))
    changed = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[(0,) * x.ndim].add(1e-3) if path_string(p) == target else x, params
    )
    shutil.rmtree(ckpt_dir / "4" / "params")
    with ocp.StandardCheckpointer() as writer:
        writer.save(ckpt_dir / "4" / "params", changed)
    with pytest.raises(CheckpointError) as err:
        restore_params(str(ckpt_dir), abstract_params())
    assert str(err.value) == (
        f"{ckpt_dir / '4'}: checksum mismatch in params/{target}: the files holding this leaf "
        "are corrupted"
    )
    with pytest.raises(SystemExit):
        sample.main(["--checkpoint", str(run), "--prompt", "a"])
    assert f"params/{target}" in capsys.readouterr().err
    assert restore_params(str(ckpt_dir), abstract_params(), step=2)[1]["step"] == 2


def test_checkpoints_with_a_whole_tree_checksum_still_load_and_are_verified(tiny_run, tmp_path):
    """Checkpoints written before per-leaf checksums (meta["checksum"] only)."""
    config = tiny_config(tmp_path, **TINY_STEPS)
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh({"data": 1}, jax.devices()[:1]))
    ckpt = Checkpointer(str(tiny_run / "checkpoints"))
    state, meta = ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    ckpt.close()
    train = {k: v for k, v in state.items() if k != "params"}
    legacy = {k: v for k, v in meta.items() if k != "leaf_checksums"}
    legacy["checksum"] = legacy_checksum((state["params"], train))
    old_dir = tmp_path / "old" / "checkpoints"
    with ocp.CheckpointManager(old_dir, item_names=("params", "train", "meta")) as manager:
        manager.save(
            4,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(legacy),
            ),
        )
    params, got_meta = restore_params(str(old_dir), abstract_params())
    assert "leaf_checksums" not in got_meta
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"]), strict=True):
        assert np.array_equal(x, y)
    resumed, _ = Checkpointer(str(old_dir)).restore(trainer.abstract_state, trainer.state_shardings)
    assert int(resumed["step"]) == 4
    flip_bytes(largest_file(old_dir / "4" / "params"))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(old_dir / '4'))}: "):
        restore_params(str(old_dir), abstract_params())


def test_non_finite_parameters_are_refused(tiny_run, tmp_path):
    """A checkpoint whose checksums match but whose values are not finite (saved by an older
    version from a diverged run) is refused."""
    run = _copy(tiny_run, tmp_path)
    ckpt_dir = run / "checkpoints"
    params, meta = restore_params(str(ckpt_dir), abstract_params())
    target = sorted(path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))[0]
    nan = jax.tree_util.tree_map_with_path(
        lambda p, x: x * jnp.nan if path_string(p) == target else x, params
    )
    sums, _ = leaf_checksums(nan)
    meta["leaf_checksums"] = meta["leaf_checksums"] | {"algorithm": ALGORITHM, "params": sums}
    shutil.rmtree(ckpt_dir / "4" / "params")
    shutil.rmtree(ckpt_dir / "4" / "meta")
    with ocp.StandardCheckpointer() as writer:
        writer.save(ckpt_dir / "4" / "params", nan)
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as writer:
        writer.save(ckpt_dir / "4" / "meta", args=ocp.args.JsonSave(meta))
    with pytest.raises(CheckpointError, match=f"non-finite values in params/{target}"):
        restore_params(str(ckpt_dir), abstract_params())
