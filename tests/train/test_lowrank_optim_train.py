"""GaLore and Fira in training (``train.optimizers``): a run killed with SIGKILL and restarted
ends bit-identical to an uninterrupted one, projector refreshes included; the checkpoint holds
their whole state (projectors, counts, moments, Fira's norms) and restores it exactly, also
onto another mesh; bad hyper-parameters on the command line are one-line config errors."""

from __future__ import annotations

import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from train_testlib import TINY_MODEL, set_args, tiny_config

from jaxattn.optim import GaLoreState, SSTState
from jaxattn.sharding import make_mesh
from train import pretrain
from train.checkpoints import Checkpointer
from train.data import make_loaders
from train.optim import path_string
from train.pretrain import build_model
from train.step import make_trainer

# projector refreshes and SST redraws at steps 0, 3, 6: one between the checkpoints at 2 and
# 4, one after the restart; SST's re-SVD after step 6's update. The attention projections
# are spectral kernels (model.parameterization=sst) trained by SST, GaLore takes the MLPs'
# down projections, Fira their gate/up, AdamW the rest: one run covers the three methods'
# states.
RULES = ("sst(rank=4,every=3,svd_every=6):/attn/",
         "galore(rank=4,update_proj_gap=3,scale=0.25):/mlp/down/",
         "fira(rank=4,update_proj_gap=3,scale=0.25):/mlp/", "adamw:.*")  # fmt: skip
# one layer of the tiny model: what these tests check (exact resume, restore onto another mesh)
# does not depend on depth, and each layer adds ~5 s of compile (init and step) on a CPU
ONE_LAYER = tuple("num_layers=1" if o.startswith("num_layers=") else o for o in TINY_MODEL)
SST_MODEL = ONE_LAYER + ("parameterization=sst", r"parameterization_paths=^layers/\d+/attn/")
STEPS = 8
# data="recall": rows generated from (seed, row), so the batches this process builds are the
# CLI runs' (the builtin corpus is read from module docstrings, which can differ between
# processes that imported different modules)
RUN = dict(steps=STEPS, warmup_steps=1, ckpt_every=2, log_every=1, steps_per_call=1,
           keep_checkpoints=10, optimizer=RULES, model_overrides=SST_MODEL,
           data="recall")  # fmt: skip


def _trainer(run_dir, mesh, **changes):
    config = tiny_config(run_dir, **(RUN | changes))
    _, model_fn = build_model(config)
    return config, make_trainer(model_fn, config, mesh)


def _one_device():
    return make_mesh({"data": 1}, jax.devices()[:1])


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _galore_states(opt_state) -> list[GaLoreState]:
    is_state = lambda x: isinstance(x, GaLoreState)
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def _assert_equal(a, b, atol=0.0):
    paths = [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(a)]
    leaves_b = jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path, x, y in zip(paths, jax.tree.leaves(a), leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        if atol:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=path)
        else:
            assert np.array_equal(x, y), path


def _restored(run_dir, step=STEPS):
    _, trainer = _trainer(run_dir, _one_device())
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    state, meta = ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    ckpt.close()
    assert meta["step"] == step
    return _host(state)


def _sst_states(opt_state):
    is_state = lambda x: isinstance(x, SSTState)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


@pytest.fixture(scope="module")
def reference_run(zygote, tmp_path_factory):
    """An uninterrupted CLI run of ``RUN`` (checkpoints at 2, 4, 6, 8), made once for the
    resume test and the other-mesh test."""
    ref = tmp_path_factory.mktemp("lowrank_optim") / "ref"
    code, out = zygote.run(set_args(RUN | {"run_dir": str(ref)}), ref.parent / "ref.log")
    assert code == 0, out[-3000:]
    return ref


def test_galore_fira_sst_run_killed_and_restarted_is_bit_identical(zygote, reference_run, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "run.log"
    pid = zygote.start(set_args(RUN | {"run_dir": str(run)}), log)
    deadline = time.time() + 120
    while time.time() < deadline:  # killed after step 5: checkpoint 4 holds refresh 3's P
        text = log.read_text() if log.exists() else ""
        assert "done in" not in text, text[-2000:]
        if f"step {5:>6}/" in text:
            break
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait(pid) == -signal.SIGKILL, log.read_text()[-3000:]
    code, out = zygote.run(set_args(RUN | {"run_dir": str(run)}), tmp_path / "run2.log")
    assert code == 0, out[-3000:]
    resumed_at = int(out.split("resumed at step")[1].split()[0])
    assert resumed_at in (2, 4), out[-3000:]  # before the refresh at 6
    a, b = _restored(reference_run), _restored(run)
    _assert_equal(a, b)  # parameters and the whole optimizer state
    galore_fira = _galore_states(a["opt_state"])
    assert len(galore_fira) == 2 and all(int(s.count) == STEPS for s in galore_fira)
    (sst,) = _sst_states(a["opt_state"])  # sampled indices, key and moments matched too
    assert int(sst.count) == STEPS and len(sst.index) == 5  # 5 spectral kernels x 1 layer
    assert "form" in a["params"]["layers"][0]["attn"]["q"]


def _rest(config, trainer):
    """The model's non-parameter state, placed as ``trainer`` wants it (the parameters'
    initialisers are dead code in this program: nothing but the rest is computed)."""
    from flax import nnx

    _, model_fn = build_model(config)

    def rest():
        with nnx.use_eager_sharding(False):
            _, _, rest = nnx.split(model_fn(), nnx.Param, ...)
        return nnx.to_pure_dict(rest)

    return jax.jit(rest, out_shardings=trainer.rest_shardings)()


# slow tier: an 8-device trainer's init and step compile (~18 s in CI). The default run still
# covers its paths: tests/train/test_checkpoints.py::test_restore_onto_a_different_mesh_reshards
# (Orbax restore onto another mesh), tests/jaxattn/optim/test_optim_sharding.py::
# test_mesh_2x2x2_equals_one_device (GaLore state sharded on 2x2x2 == one device) and
# the resume test above (the whole GaLore/Fira/SST state through a checkpoint, bit-exact)
@pytest.mark.slow
def test_galore_fira_sst_state_restores_onto_another_mesh(reference_run, tmp_path):
    """The one-device reference run's checkpoint at step 2, restored on a 2x2x2 mesh (the
    projectors and projected moments keep their parameter's sharding) and trained 2 more
    steps (GaLore/Fira's refresh and SST's redraw at 3), equals its checkpoint at 4 within
    1e-5; the checkpoints hold the whole state (projectors, counts, moments, Fira's norms)."""
    for step in (2, 4):  # a run directory per checkpoint: restore takes the newest
        shutil.copytree(reference_run / "checkpoints" / str(step),
                        tmp_path / f"at{step}" / "checkpoints" / str(step))  # fmt: skip
    at2, at4 = _restored(tmp_path / "at2", step=2), _restored(tmp_path / "at4", step=4)
    galore2, _ = _galore_states(at2["opt_state"])
    galore, fira = _galore_states(at4["opt_state"])
    old, now = jax.tree.leaves(galore2[1:3]), jax.tree.leaves(galore[1:3])  # left, right
    refreshed = [not np.array_equal(x, y) for x, y in zip(old, now, strict=True)]
    assert len(refreshed) >= 1 and all(refreshed)  # every projected leaf has a projector
    assert int(galore.count) == 4 and galore.count.dtype == np.int32
    assert len(jax.tree.leaves(fira.fira_norm)) >= 2  # gate, up
    assert all(float(x) > 0 for x in jax.tree.leaves(fira.fira_norm))
    assert any(np.any(x != 0) for x in jax.tree.leaves(galore.inner))  # the moments
    config, eight = _trainer(tmp_path / "at2", make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    ckpt = Checkpointer(str(tmp_path / "at2" / "checkpoints"))
    state, meta = ckpt.restore(eight.abstract_state, eight.state_shardings)
    ckpt.close()
    assert meta["step"] == 2
    _assert_equal(at2, _host(state))
    lowrank = jax.tree.leaves(_galore_states(state["opt_state"]))
    assert any(not x.sharding.is_fully_replicated for x in lowrank)
    loader, _ = make_loaders(config)
    rest = _rest(config, eight)
    for step in range(2, 4):
        state, metrics = eight.train_step(state, rest, eight.put_batch(loader.batch(step)))
        assert bool(metrics["finite"])
    _assert_equal(_host(state), at4, atol=1e-5)


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("config error: "), err
    return err[0]


@pytest.mark.parametrize(
    "rule, message",
    [
        ("galore(rank=40):/attn/", "rank=40 is larger than the smaller side of"),
        ("galore(rank=4,update_proj_gap=0):/attn/", "update_proj_gap=0 must be a positive int"),
        ("fira(rank=4,proj_type='sideways'):/mlp/", "proj_type='sideways' is not one of"),
    ],
    ids=["rank", "gap", "proj_type"],
)
def test_bad_lowrank_hyperparameters_are_config_errors(rule, message, tmp_path, capsys):
    run = tmp_path / "run"
    argv = set_args({"run_dir": str(run), "optimizer": f"{rule},adamw:.*"})
    err = _usage_error(argv, capsys)
    assert f"optimizer rule {rule!r}" in err and message in err, err
    if "rank" in message:
        assert "layers/0/attn/" in err and "(rank <= 32)" in err, err
    assert not run.exists()


def test_sltrain_refactor_state_restores_exactly_and_continues_bit_identical(tmp_path):
    """SLTrain kernels with the ``refactor`` rule (refactor + momentum reset every 2 steps,
    inside the compiled step): 3 steps, an Orbax save and restore; a fresh init rebuilds the
    same sparse supports from the seed; 2 more steps from the restored state are
    bit-identical to going on."""
    overrides = ONE_LAYER + ("parameterization=sltrain", "parameterization_rank=8")
    config, one = _trainer(tmp_path, _one_device(), model_overrides=overrides,
                           optimizer=("refactor(every=2):.*",))  # fmt: skip
    loader, _ = make_loaders(config)
    state, rest = one.init()
    supports = [p for p, _ in jax.tree_util.tree_leaves_with_path(rest)
                if path_string(p).endswith("form/support")]  # fmt: skip
    assert len(supports) == 8  # attention (5) + MLP (3) x 1 layer; not the embed, head
    for step in range(3):
        state, _ = one.train_step(state, rest, one.put_batch(loader.batch(step)))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), every=1, async_save=False)
    ckpt.save(3, state, {}, force=True)
    ckpt.wait()
    saved = _host(state)
    _, rest2 = one.init()
    _assert_equal(_host(rest), _host(rest2))  # the supports, rebuilt from the seed
    restored, _ = ckpt.restore(one.abstract_state, one.state_shardings)
    ckpt.close()
    _assert_equal(saved, _host(restored))
    for step in range(3, 5):
        batch = loader.batch(step)
        state, _ = one.train_step(state, rest, one.put_batch(batch))
        restored, _ = one.train_step(restored, rest2, one.put_batch(batch))
    _assert_equal(_host(state), _host(restored))
    counts = sorted(int(x) for p, x in jax.tree_util.tree_leaves_with_path(_host(state))
                    if path_string(p).endswith("count"))  # fmt: skip
    assert counts == [1, 5, 5]  # Adam restarted at step 4; the refactor's, the schedule's go on


def test_model_set_prefix_and_bad_parameterization_are_config_errors(tmp_path, capsys):
    from train.config import TrainConfig, apply_overrides

    config = apply_overrides(TrainConfig(), ["model.parameterization=sltrain",
                                             "model.sltrain_density=0.05"])  # fmt: skip
    assert config.model_overrides == ("parameterization=sltrain", "sltrain_density=0.05")
    run = tmp_path / "run"
    err = _usage_error(set_args({"run_dir": str(run), "model.parameterization": "sltrian"}), capsys)
    assert "parameterization='sltrian' is not one of" in err and "did you mean" in err, err
    argv = set_args({"run_dir": str(run), "optimizer": "sst(rank=4):.*"})
    err = _usage_error(argv, capsys)
    assert "optimizer rule 'sst(rank=4):.*'" in err and "takes no sst kernel" in err, err
    argv = set_args({"run_dir": str(run), "optimizer": "sst(rank=4,every=2,svd_every=3):.*",
                     "model.parameterization": "sst"})  # fmt: skip
    err = _usage_error(argv, capsys)
    assert "svd_every=3 must be a multiple of every=2" in err, err
    assert not run.exists()


def test_spectral_kernels_without_the_sst_rule_warn_naming_it():
    """model.parameterization=sst trained by AdamW alone: a warning naming the missing 'sst'
    rule (no sampling, no re-SVD); with the sst rule, or the kernels frozen, none."""
    import warnings

    from train.config import TrainConfig
    from train.optim import ParamInfo, make_optimizer

    shapes = {"u": (8, 4), "s": (4,), "vt": (4, 6)}
    infos = {f"layers/0/attn/q/form/{n}": ParamInfo(f"layers/0/attn/q/form/{n}", sh,
                                                    (None,) * len(sh), 1)
             for n, sh in shapes.items()}  # fmt: skip
    infos["embed/table"] = ParamInfo("embed/table", (5, 8), (None, None), 1)
    with pytest.warns(
        UserWarning,
        match=r"'layers/0/attn/q/form'\) are trained by the 'adamw' "
        r"rule, not the 'sst' optimizer rule: no sampled .* no periodic re-SVD",
    ):
        make_optimizer(TrainConfig(optimizer=("adamw:.*",)), infos)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rules in (("sst(rank=2,every=2):/attn/", "adamw:.*"), ("frozen:/attn/", "adamw:.*")):
            make_optimizer(TrainConfig(optimizer=rules), infos)
