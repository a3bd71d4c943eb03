"""The head-layout kinds of issue 15 train through ``python -m train.pretrain --config ...``.

* default run: one CLI run of ``train/configs/moh.py`` (``moh-tiny`` cut to one layer): 5 steps,
  metrics written and checkpointed, the loss falls, MoH's router reports its load-balance loss
  as ``aux_loss`` (the train step's auxiliary-loss seam); the model reloaded from its
  checkpoint generates greedily as its full forwards do;
* slow tier: the same through ``train/configs/head_layouts.py`` (``head-layouts-tiny``: every
  kind, one per layer, mixed in one model; every kind's own cache, CCGQA's latent history and
  DGQA's non-parameter state among them);
* every kind's own ``train/configs/<kind>.py`` names its ``<kind>-tiny`` model, whose every
  layer is that kind, and its train step traces (``jax.eval_shape``: the same program the CLI
  compiles, not compiled here); only MoH sows an auxiliary loss;
* the aux-loss weight enters the gradient; DGQA's statistic is carried by train.step,
  checkpointed and resumed.
"""

from __future__ import annotations

import json
import math

import pytest
from train_testlib import as_set_args

SMALL = dict(
    seq_len=16, batch_size=4, steps=5, warmup_steps=1, ckpt_every=5, log_every=1,
    steps_per_call=5, eval_every=1000, eval_batches=1, tensorboard=False, plot=False,
    async_checkpoint=False, sample_tokens=0,
)  # fmt: skip

# config file -> (model name, the kind of its every layer)
KINDS = {
    "moh": ("moh-tiny", "moh"),
    "ssa": ("ssa-tiny", "ssa"),
    "kdgqa": ("kdgqa-tiny", "kdgqa"),
    "dgqa": ("dgqa-tiny", "dgqa"),
    "pgqa": ("pgqa-tiny", "pgqa"),
    "diffqkv": ("diffqkv-tiny", "diffqkv"),
    "ccgqa": ("ccgqa-tiny", "cca"),
    "lowrank_mhsa": ("lowrank-mhsa-tiny", "lowrank_mhsa"),
}


def _cli_run(zygote, tmp, config_file, **changes):
    """Run directory and output of a 5-step CLI run of ``config_file``."""
    run = tmp / "run"
    argv = ["--config", config_file]
    code, out = zygote.run(argv + as_set_args(SMALL | {"run_dir": str(run)} | changes), tmp / "log")
    assert code == 0, out[-3000:]
    return run, out


@pytest.fixture(scope="module")
def moh_run(zygote, tmp_path_factory):
    """The default run's end-to-end case: ``train/configs/moh.py`` with one layer."""
    tmp = tmp_path_factory.mktemp("moh")
    return _cli_run(zygote, tmp, "train/configs/moh.py", model_overrides=("num_layers=1",))


@pytest.fixture(scope="module")
def mixed_run(zygote, tmp_path_factory):
    """Run directory and output of the 5-step CLI run of ``train/configs/head_layouts.py``."""
    return _cli_run(
        zygote, tmp_path_factory.mktemp("head_layouts"), "train/configs/head_layouts.py"
    )


def _check_train_metrics(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5], train
    assert all(math.isfinite(r["loss"]) for r in train), train
    assert train[-1]["loss"] < train[0]["loss"] - 0.05, train  # lr 2e-3 from a uniform 5.55
    # MoH's layer: E² · mean(P · f), = k = 3 at perfectly balanced routing (E = 6 routed heads)
    assert all(0.0 < r["aux_loss"] < 6 * 6 for r in train), train


def _check_generates_greedily(model):
    """Greedy ``generate`` (every layer's own cache) equals the argmax of full forwards."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxattn.generate import generate

    fwd = nnx.jit(lambda m, t: m(t))
    prompt = jnp.asarray(np.random.default_rng(3).integers(0, 256, (1, 5)), jnp.int32)
    out = generate(model, prompt, jnp.asarray([5]), max_new_tokens=3, rng=jax.random.key(0))
    seq = np.zeros((1, 8), np.int32)
    seq[0, :5] = np.asarray(prompt[0])
    for i in range(5, 8):
        seq[0, i] = int(jnp.argmax(fwd(model, jnp.asarray(seq))[0, i - 1]))
    np.testing.assert_array_equal(out.tokens_BS[0, :8], seq[0])


def test_moh_trains_checkpoints_and_reports_aux_loss_through_the_cli(moh_run):
    from models import get_config

    run, out = moh_run
    assert "moh-tiny" in out
    assert get_config("moh-tiny").layer_attention_config(0).kind == "moh"
    _check_train_metrics(run)


def test_moh_model_reloaded_generates_greedily(moh_run):
    from train.sample import load_model

    model, meta = load_model(str(moh_run[0]))
    assert meta["step"] == 5 and len(model.layers) == 1
    _check_generates_greedily(model)


# slow: the 8-layer mixed model compiles its train step, final eval, generate and forwards
# (~90 s of CI); the default run covers each path per kind: the moh CLI run above (script,
# metrics, aux loss, checkpoint, reload, generate), every kind's config tracing its train step
# (test_kind_config_names_its_model_and_its_train_step_traces), every kind's prefill + steps ==
# forward (tests/jaxattn/layers/test_*_layer.py, kdgqa + dgqa mixed per layer there), DGQA's
# statistic through train.step and a checkpoint (test_dgqa_statistic_carried_...).
@pytest.mark.slow
def test_mixed_kinds_train_through_the_cli(mixed_run):
    from models import get_config

    run, out = mixed_run
    assert "head-layouts-tiny" in out
    config = get_config("head-layouts-tiny")
    kinds = [config.layer_attention_config(i).kind for i in range(config.num_layers)]
    assert sorted(kinds) == sorted(kind for _, kind in KINDS.values())  # every kind, once
    _check_train_metrics(run)


@pytest.mark.slow  # see test_mixed_kinds_train_through_the_cli
def test_mixed_model_reloaded_generates_greedily(mixed_run):
    """The model reloaded from the run's checkpoint: greedy ``generate`` (every layer's own
    cache) equals the argmax of full forwards."""
    import numpy as np

    from train.sample import load_model

    model, meta = load_model(str(mixed_run[0]))
    assert meta["step"] == 5
    # DGQA's EMA as trained (carried by train.step over the 5 steps, checkpointed, reloaded)
    (dgqa,) = [b.attn for b in model.layers if b.attn.config.kind == "dgqa"]
    assert np.abs(np.asarray(dgqa.key_norm_ema[...]) - 1).min() > 1e-3
    _check_generates_greedily(model)


@pytest.mark.parametrize("name", list(KINDS))
def test_kind_config_names_its_model_and_its_train_step_traces(tmp_path, name):
    import jax
    import numpy as np

    from jaxattn.layers._aux import pop_aux_loss
    from jaxattn.sharding import make_mesh
    from models import get_config
    from train.config import load_config
    from train.pretrain import build_model
    from train.step import make_trainer

    model_name, kind = KINDS[name]
    overrides = as_set_args(SMALL | {"run_dir": str(tmp_path)})[1::2]  # the "key=value"s
    config = load_config(f"train/configs/{name}.py", overrides)
    assert config.model == model_name and (kind != "moh" or config.aux_loss_weight > 0)
    model_config = get_config(model_name)
    layers = range(model_config.num_layers)
    assert {model_config.layer_attention_config(i).kind for i in layers} == {kind}
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh({"data": 1}, jax.devices()[:1]))
    shape = (config.batch_size, config.seq_len)
    batch = {
        "inputs_BT": jax.ShapeDtypeStruct(shape, np.int32),
        "targets_BT": jax.ShapeDtypeStruct(shape, np.int32),
        "weights_BT": jax.ShapeDtypeStruct(shape, np.float32),
    }
    rest = trainer.abstract_rest
    state, metrics = jax.eval_shape(trainer.train_step, trainer.abstract_state, rest, batch)
    assert jax.tree.structure(state) == jax.tree.structure(trainer.abstract_state)
    assert metrics["loss"].shape == ()

    def sown(tokens_BT):  # the auxiliary loss a training forward sows (None: none)
        model = model_fn()
        model(tokens_BT, rng=jax.random.key(0))
        aux = pop_aux_loss(model)
        return jax.numpy.zeros((0,)) if aux is None else aux

    out = jax.eval_shape(sown, batch["inputs_BT"])
    assert (out.shape == ()) == (kind == "moh"), out


def test_aux_loss_weight_enters_the_gradient(tmp_path):
    """train.step's objective is NLL + aux_loss_weight · L_b: the step's gradient norm equals
    ||∇NLL + w · ∇L_b|| computed here from the model (w = 1), not ||∇NLL||. One layer, d 32."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from train_testlib import tiny_config

    from jaxattn.layers._aux import pop_aux_loss
    from jaxattn.sharding import make_mesh
    from train.data import make_loaders
    from train.pretrain import build_model
    from train.step import make_trainer, token_loss_sums

    overrides = ("num_layers=1", "d_model=32", "mlp_dim=64", "num_heads=8", "num_kv_heads=4")
    config = tiny_config(
        tmp_path, model="moh-tiny", model_overrides=overrides, aux_loss_weight=1.0,
        seq_len=8, batch_size=2,
    )  # fmt: skip
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh({"data": 1}, jax.devices()[:1]))
    state, rest = trainer.init()
    batch = trainer.put_batch(make_loaders(config)[0].batch(0))
    params = jax.tree.map(np.asarray, state["params"])

    @jax.jit
    def grads(params):  # one forward, two backward passes (the NLL's and L_b's)
        def parts(params):
            model = trainer.model(params, rest)
            total, weight = token_loss_sums(
                model(batch["inputs_BT"]), batch["targets_BT"], batch["weights_BT"]
            )
            return jnp.stack([total / weight, pop_aux_loss(model)])

        _, vjp = jax.vjp(parts, params)
        return vjp(jnp.asarray([1.0, 0.0]))[0], vjp(jnp.asarray([0.0, 1.0]))[0]

    nll_grad, lb_grad = grads(params)
    norm = lambda g: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))
    router = [x for p, x in nnx.to_flat_state(nnx.State(lb_grad)) if "router" in str(p)]
    assert router and max(float(np.abs(x).max()) for x in router) > 0  # L_b moves the router
    want = norm(jax.tree.map(lambda a, b: a + b, nll_grad, lb_grad))
    _, metrics = trainer.train_step(state, rest, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), want, rtol=1e-4)
    assert abs(want - norm(nll_grad)) > 1e-3 * want  # the weight made a difference


def _key_norms(params, tokens_BT, eps=1e-5):
    """mean over tokens of ||k_k|| at layer 0 of a one-layer llama model, in numpy (float64):
    embedding row, RMSNorm, the k projection (no qk-norm; RoPE keeps norms)."""
    import numpy as np

    x = np.asarray(params["embed"]["table"], np.float64)[np.asarray(tokens_BT)]
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    x = x * np.asarray(params["layers"][0]["attn_norm"]["scale"], np.float64)
    k = np.einsum("btd,dkh->btkh", x, np.asarray(params["layers"][0]["attn"]["k"]["kernel"]))
    return np.linalg.norm(k, axis=-1).reshape(-1, k.shape[2]).mean(0)


def test_dgqa_statistic_carried_across_train_steps_and_resumed(tmp_path):
    """train.step carries DGQA's key-norm EMA (an nnx.BatchStat) in ``state["stats"]``: after
    two steps it is the recurrence m ← 0.9·m + 0.1·mean ||k|| applied twice (each with the
    parameters that step saw, computed here in numpy); evaluation leaves it alone; a checkpoint
    restores it and the next step continues from it."""
    import jax
    import numpy as np
    from flax import nnx
    from train_testlib import tiny_config

    from jaxattn.sharding import make_mesh
    from train.checkpoints import Checkpointer
    from train.data import make_loaders
    from train.pretrain import build_model
    from train.step import make_trainer

    config = tiny_config(
        tmp_path, model="dgqa-tiny", model_overrides=("num_layers=1",), seq_len=8, batch_size=2
    )
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh({"data": 1}, jax.devices()[:1]))
    state, rest = trainer.init()
    ema = lambda s: np.asarray(s["stats"]["layers"][0]["attn"]["key_norm_ema"])  # noqa: E731
    np.testing.assert_array_equal(ema(state), [1.0, 1.0])
    loader = make_loaders(config)[0]
    m = np.ones(2)
    for step in range(2):
        batch = trainer.put_batch(loader.batch(step))
        params = jax.tree.map(np.asarray, state["params"])  # what this step sees
        m = 0.9 * m + 0.1 * _key_norms(params, batch["inputs_BT"])
        state, _ = trainer.train_step(state, rest, batch)
    np.testing.assert_allclose(ema(state), m, rtol=1e-5)
    assert np.abs(m - 1).min() > 1e-3  # the statistic really moved

    # evaluation: the state's statistic in the model (with_stats), and a forward keeps it
    params = jax.tree.map(np.asarray, state["params"])
    model = trainer.model(params, trainer.with_stats(rest, state))
    nnx.jit(lambda m, t: m(t))(model, np.asarray(loader.batch(0)["inputs_BT"]))
    np.testing.assert_allclose(model.layers[0].attn.key_norm_ema[...], m, rtol=1e-5)

    ckpt = Checkpointer(str(tmp_path / "ckpt"), every=2, async_save=False)
    ckpt.save(2, state, {"step": 2})
    restored, _ = ckpt.restore(trainer.abstract_state, trainer.state_shardings)
    ckpt.close()
    np.testing.assert_array_equal(ema(restored), ema(state))
    batch = trainer.put_batch(loader.batch(2))
    params = jax.tree.map(np.asarray, restored["params"])
    m = 0.9 * m + 0.1 * _key_norms(params, batch["inputs_BT"])
    restored, _ = trainer.train_step(restored, rest, batch)
    np.testing.assert_allclose(ema(restored), m, rtol=1e-5)


def test_mixed_model_train_step_traces_on_a_sharded_mesh(tmp_path):
    """The mesh: ``head-layouts-tiny`` (every kind, one per layer) on data x fsdp x tensor =
    2 x 2 x 2 fake devices: every parameter and DGQA's statistic get a sharding of that mesh,
    every layer's output projection is split, LAMA's single shared k/v head stays replicated
    on "tensor" (1 head does not split in 2), and the train step traces with them
    (``jax.eval_shape``; the 1-device CLI run compiles it)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from jaxattn.sharding import make_mesh
    from train.config import load_config
    from train.pretrain import build_model
    from train.step import make_trainer

    changes = SMALL | {"run_dir": str(tmp_path), "batch_size": 8}  # one row per device
    config = load_config("train/configs/head_layouts.py", as_set_args(changes)[1::2])
    _, model_fn = build_model(config)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    trainer = make_trainer(model_fn, config, mesh)
    shardings = trainer.state_shardings
    leaves = jax.tree.leaves(shardings["params"]) + jax.tree.leaves(shardings["stats"])
    assert leaves and all(isinstance(s, NamedSharding) and s.mesh == mesh for s in leaves)
    shared_heads = 0
    for i, layer in shardings["params"]["layers"].items():
        spec = layer["attn"]["o"]["kernel"].spec
        assert any(a is not None for a in spec), (i, spec)  # not replicated
        if "key" in layer["attn"]:  # LAMA's one shared k/v head: replicated on "tensor"
            for name in ("key", "v"):
                assert tuple(layer["attn"][name]["kernel"].spec)[1:] == (None, None), (i, name)
            shared_heads += 1
    assert shared_heads == 1
    shape = (config.batch_size, config.seq_len)
    batch = {
        "inputs_BT": jax.ShapeDtypeStruct(shape, np.int32),
        "targets_BT": jax.ShapeDtypeStruct(shape, np.int32),
        "weights_BT": jax.ShapeDtypeStruct(shape, np.float32),
    }
    state, metrics = jax.eval_shape(
        trainer.train_step, trainer.abstract_state, trainer.abstract_rest, batch
    )
    assert jax.tree.structure(state) == jax.tree.structure(trainer.abstract_state)
    assert metrics["loss"].shape == () and metrics["aux_loss"].shape == ()
