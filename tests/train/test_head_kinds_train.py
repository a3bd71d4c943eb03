"""train/configs/<kind>.py of every head-layout kind trains through ``python -m train.pretrain
--config ...``: 5 steps of each (one layer, short sequences), metrics written and checkpointed;
MoH's router reports its load-balance loss as ``aux_loss`` (the train step's auxiliary-loss
seam), the others sow none; the CCGQA and DGQA models reloaded from their checkpoints generate
greedily as their full forwards do."""

from __future__ import annotations

import json
import math

import pytest
from train_testlib import as_set_args

SMALL = dict(
    seq_len=16, batch_size=4, steps=5, warmup_steps=1, ckpt_every=5, log_every=5,
    steps_per_call=5, eval_every=1000, eval_batches=1, tensorboard=False, plot=False,
    async_checkpoint=False, sample_tokens=0, model_overrides=("num_layers=1",),
)  # fmt: skip


KINDS = ["moh", "ssa", "kdgqa", "dgqa", "pgqa", "diffqkv", "ccgqa", "lowrank_mhsa"]


@pytest.mark.parametrize("kind", KINDS)
def test_head_kind_config_trains(zygote, tmp_path, kind):
    run = tmp_path / "run"
    argv = ["--config", f"train/configs/{kind}.py"]
    code, out = zygote.run(argv + as_set_args(SMALL | {"run_dir": str(run)}), tmp_path / "log")
    assert code == 0, out[-3000:]
    assert f"{kind.replace('_', '-')}-tiny" in out
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r for r in rows if r.get("split") == "train"]
    assert train and train[-1]["step"] == 5 and math.isfinite(train[-1]["loss"]), train
    if kind == "moh":  # E² · mean(P · f), = k = 3 at perfectly balanced routing
        assert 0.0 < train[-1]["aux_loss"] < 6 * 6, train
    else:
        assert "aux_loss" not in train[-1], train
    if kind in ("ccgqa", "dgqa"):  # their own cache / their own non-parameter state
        _reloaded_generate_is_greedy(run)


def _reloaded_generate_is_greedy(run):
    """The model reloaded from the run's checkpoint: greedy ``generate`` (its caches) equals
    the argmax of full forwards."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxattn.generate import generate
    from train.sample import load_model

    model, meta = load_model(str(run))
    assert meta["step"] == 5
    fwd = nnx.jit(lambda m, t: m(t))
    prompt = jax.random.randint(jax.random.key(3), (1, 5), 0, 256)
    out = generate(model, prompt, jnp.asarray([5]), max_new_tokens=3, rng=jax.random.key(0))
    seq = jnp.zeros((1, 8), jnp.int32).at[0, :5].set(prompt[0])
    for i in range(5, 8):
        seq = seq.at[0, i].set(jnp.argmax(fwd(model, seq)[0, i - 1]).astype(jnp.int32))
    np.testing.assert_array_equal(out.tokens_BS[0, :8], seq[0])


def test_aux_loss_weight_enters_the_gradient(tmp_path):
    """train.step's objective is NLL + aux_loss_weight · L_b: the step's gradient norm equals
    ||∇NLL + w · ∇L_b|| computed here from the model (w = 1), not ||∇NLL||. One layer, d 32."""
    import jax
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
    def grads(params):
        def parts(params):
            model = trainer.model(params, rest)
            total, weight = token_loss_sums(
                model(batch["inputs_BT"]), batch["targets_BT"], batch["weights_BT"]
            )
            return total / weight, pop_aux_loss(model)

        nll_grad = jax.grad(lambda p: parts(p)[0])(params)
        lb_grad = jax.grad(lambda p: parts(p)[1])(params)
        return nll_grad, lb_grad

    nll_grad, lb_grad = grads(params)
    norm = lambda g: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))
    router = [x for p, x in nnx.to_flat_state(nnx.State(lb_grad)) if "router" in str(p)]
    assert router and max(float(np.abs(x).max()) for x in router) > 0  # L_b moves the router
    want = norm(jax.tree.map(lambda a, b: a + b, nll_grad, lb_grad))
    _, metrics = trainer.train_step(state, rest, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), want, rtol=1e-4)
    assert abs(want - norm(nll_grad)) > 1e-3 * want  # the weight made a difference
