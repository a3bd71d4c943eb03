"""The sharded train step: 8 fake devices (data x fsdp x tensor = 2x2x2) equal one device;
gradient accumulation and rematerialisation do not change the step."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from train_testlib import tiny_config

from jaxattn.sharding import make_mesh
from train.data import make_loaders
from train.pretrain import build_model
from train.step import make_trainer


def _run_steps(config, mesh_shape, devices, init=None, steps=2):
    """Loss per step, final params (numpy) and state of ``steps`` train steps.

    ``init``: host (numpy) initial ``(state, rest)`` to start from (placed on this trainer's
    mesh), so variants share one compiled init.
    """
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh(mesh_shape, devices))
    loader, _ = make_loaders(config)
    if init is None:
        state, rest = trainer.init()
    else:
        state = jax.device_put(init[0], trainer.state_shardings)
        rest = jax.device_put(init[1], trainer.rest_shardings)
    losses = []
    for step in range(steps):
        state, metrics = trainer.train_step(state, rest, trainer.put_batch(loader.batch(step)))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, state["params"]), state


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    """Config, shared host initial state, and the single-device reference run."""
    config = tiny_config(tmp_path_factory.mktemp("run"))
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh({"data": 1}, jax.devices()[:1]))
    init = jax.tree.map(np.asarray, trainer.init())
    return config, init, _run_steps(config, {"data": 1}, jax.devices()[:1], init)


def test_sharded_2x2x2_step_equals_single_device(single_device):
    config, init, (losses_1, params_1, _) = single_device
    assert len(jax.devices()) == 8
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    losses_8, params_8, state_8 = _run_steps(config, mesh, None, init)
    np.testing.assert_allclose(losses_8, losses_1, atol=1e-5, rtol=0)
    assert _max_diff(params_8, params_1) < 1e-5
    # the parameters really are split over the mesh
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state_8["params"])}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs


@pytest.mark.parametrize(
    "change",
    [{"grad_accum": 2, "remat": "full"}, {"remat": "blocks"}],
    ids=["accum2_full", "blocks"],
)
def test_accumulation_and_remat_keep_the_step(single_device, change):
    config, init, (losses_1, params_1, _) = single_device
    losses, params, _ = _run_steps(
        dataclasses.replace(config, **change), {"data": 1}, jax.devices()[:1], init
    )
    np.testing.assert_allclose(losses, losses_1, atol=1e-5, rtol=0)
    assert _max_diff(params, params_1) < 1e-5


def test_bf16_compute_keeps_fp32_master_weights(single_device):
    config, init, (losses_1, _, _) = single_device
    losses, params, _ = _run_steps(
        dataclasses.replace(config, compute_dtype="bfloat16"), {"data": 1}, jax.devices()[:1], init
    )
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    np.testing.assert_allclose(losses, losses_1, atol=0.05)  # bf16 rounding only


@pytest.mark.parametrize(
    "mesh", [{"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}], ids=["1dev", "2x2x2"]
)
def test_train_steps_in_one_call_equal_single_steps(single_device, mesh):
    """``train_steps`` (one lax.scan call over stacked batches) takes the same steps as
    ``train_step`` called once per batch: per-step losses and the final parameters."""
    config, init, (losses_1, params_1, _) = single_device
    _, model_fn = build_model(config)
    devices = jax.devices()[:1] if mesh == {"data": 1} else None
    trainer = make_trainer(model_fn, config, make_mesh(mesh, devices))
    loader, _ = make_loaders(config)
    state = jax.device_put(init[0], trainer.state_shardings)
    rest = jax.device_put(init[1], trainer.rest_shardings)
    batches = [loader.batch(step) for step in range(len(losses_1))]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    state, metrics = trainer.train_steps(state, rest, trainer.put_batches(stacked))
    assert metrics["loss"].shape == (len(losses_1),)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses_1, atol=1e-5, rtol=0)
    assert _max_diff(jax.tree.map(np.asarray, state["params"]), params_1) < 1e-5
    assert int(state["step"]) == len(losses_1)
