"""Sharded train state and the jitted train/eval steps, generic over any NNX language model.

A model is anything built by a zero-argument ``model_fn`` whose instances are called as
``model(tokens_BT, rng=key, **batch_extras) -> logits_BTV`` (``rng``: a fresh key every train
step, None in evaluation; extras: the batch's entries other than inputs/targets/weights) and
whose parameters carry logical axis names (``nnx.with_partitioning``). The train state is a
plain pytree::

    {"params": fp32 master weights, "opt_state": optax state, "step": int32[], "rng": uint32[2]}

``params`` is a pure dict (``nnx.to_pure_dict``); each leaf is placed by the logical-axis rules
of ``jaxattn.sharding``, and optimizer moments are placed like the parameter they track
(low-rank states, such as GaLore's, by ``jaxattn.optim.state_spec``: see ``_like_params``).
``opt_state`` covers only the trainable parameters (``config.optimizer``, see ``train.optim``):
the step differentiates the loss w.r.t. those alone, frozen ones enter as constants.
Non-parameter model state (``rest``: rng streams, constant tables) is replicated and untrained.
Statistics a layer tracks in training (``nnx.BatchStat`` variables, e.g. DGQA's key-norm EMA)
are carried by the state as ``state["stats"]`` (present only for models that have any): each
train step starts from them and returns their updated values, so they persist across steps
and are checkpointed and resumed with the optimizer state; ``rest`` holds their birth values,
and :meth:`Trainer.with_stats` puts the state's current ones into it (for evaluation, sampling).

Every step reports ``finite``: whether its loss, gradient norm and updated parameters are all
finite. With ``config.nonfinite == "skip"`` a step that is not finite keeps the previous
parameters and optimizer state (a select inside the compiled step, as
``optax.apply_if_finite`` does; the step counter and RNG still advance, so the data moves on,
while the optimizer's own count, hence its learning-rate schedule, stays where it was); with
"stop" the state is updated regardless and the loop stops at that step (``train.loop``), so
no select is compiled in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxattn.layers._aux import pop_aux_loss
from jaxattn.optim.specs import state_spec
from jaxattn.sharding import logical_sharding, logical_to_spec
from train.integrity import all_finite
from train.optim import make_optimizer, merge_params, param_infos, path_string, split_params

__all__ = ["Trainer", "auto_mesh", "make_trainer", "token_loss_sums"]

# batch entries the loss reads; every other entry is passed to the model as a context field
# (``model(inputs_BT, rng=key, positions_BT=..., segment_ids_BT=..., sequence_ids_B=...)``)
_LOSS_KEYS = ("inputs_BT", "targets_BT", "weights_BT")


def _pure(state) -> dict:
    return nnx.to_pure_dict(state)


def _names_tree(abstract_params, leaf) -> dict:
    """Pure dict of ``leaf(names, shape)`` per parameter: its logical axis names (a tuple;
    all-None where unannotated) and its shape."""
    tree: dict = {}
    for path, var in nnx.to_flat_state(abstract_params):
        value = var.get_value()
        names = var.get_metadata().get("out_sharding") or (None,) * value.ndim
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf(tuple(names), tuple(value.shape))
    return tree


def _like_params(tree, param_shardings: dict, infos: dict, mesh) -> object:
    """Shardings for an optimizer-state-like ``tree``. A leaf whose path ends with a
    parameter's path is placed by ``jaxattn.optim.state_spec`` from that parameter's spec:
    its own sharding at its shape (Adam moments), the parameter's row / column sharding on a
    dim of the parameter's matrix view ``[m, n]`` (GaLore's projectors ``P_mr`` / ``Q_rn`` and
    projected moments ``R_rn`` / ``R_mr``; the rank dim replicated). Everything else (counts,
    Fira's norms, DCT indices, quantised codes and scales) is replicated."""
    by_path = {path_string(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        parts = path_string(path).split("/")
        for i in range(len(parts)):
            key = "/".join(parts[i:])
            if key in by_path:
                info = infos[key]
                spec = state_spec(by_path[key].spec, info.shape, leaf.shape, info.fan_in_axes)
                return NamedSharding(mesh, spec)
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with all axes in Auto mode.

    ``jax.make_mesh`` (hence ``jaxattn.sharding.make_mesh``) makes Explicit axes, under which
    ops such as an embedding gather with batch-sharded indices need explicit output shardings;
    training places parameters and batches with in/out shardings and lets XLA propagate the
    rest, so any model runs unchanged.
    """
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def token_loss_sums(logits_BTV, targets_BT, weights_BT):
    """Summed weighted next-token NLL and summed weight (fp32), for exact averaging later."""
    # log-softmax in fp32: bf16 logits lose the max subtraction's precision
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


@dataclasses.dataclass
class Trainer:
    """Compiled steps and shardings for one model, config and mesh.

    Attributes:
      init: ``() -> (state, rest)``, sharded fresh state.
      train_step: ``(state, rest, batch) -> (state, metrics)``; the state is donated;
        metrics: ``loss``, ``grad_norm``, ``aux_loss`` (the layers' sown auxiliary losses,
        ``jaxattn.layers._aux``; 0 when none; added to the objective times
        ``config.aux_loss_weight``), ``tokens``, ``finite`` (see the module docstring).
      train_steps: ``(state, rest, batches) -> (state, metrics)``: ``train_step`` over the
        leading axis of ``batches`` ([n, B, T] each) in one call (a ``lax.scan``), metrics
        stacked to [n]. The same steps in one executable: XLA:CPU maps the step's temporary
        buffer (224 MB for the default model, every page faulted in anew) once per call, so
        one call per step spends ~55K page faults per step on it; n steps share them.
      eval_step: ``(params, rest, batch) -> (nll_sum, weight_sum)``.
      batch_sharding: NamedSharding of ``[B, T]`` batch arrays.
      trainable: the paths of the trainable parameters (``config.optimizer``'s non-frozen
        rules); ``opt_state`` covers these only.
      param_infos: every parameter's ``train.optim.ParamInfo`` by path.
    """

    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh
    optimizer: optax.GradientTransformation
    state_shardings: dict
    rest_shardings: dict
    batch_sharding: NamedSharding
    abstract_state: dict
    abstract_rest: dict
    init: Callable
    train_step: Callable
    eval_step: Callable
    train_steps: Callable
    steps_sharding: NamedSharding
    trainable: frozenset = frozenset()
    param_infos: dict = dataclasses.field(default_factory=dict)

    def put_batch(self, local_batch: dict) -> dict:
        """Global arrays from this host's rows of a batch (numpy, [B_local, T])."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()
        }

    def put_batches(self, local_batches: dict) -> dict:
        """Global arrays from this host's rows of stacked batches (numpy, [n, B_local, T])."""
        return {
            k: jax.make_array_from_process_local_data(self.steps_sharding, v)
            for k, v in local_batches.items()
        }

    def model(self, params, rest) -> nnx.Module:
        """An NNX model holding ``params`` (e.g. for sampling; ``rest`` from :meth:`with_stats`
        for the trained statistics)."""
        return nnx.merge(self.graphdef, params, rest)

    def with_stats(self, rest: dict, state: dict) -> dict:
        """``rest`` with the tracked statistics of ``state`` (``state["stats"]``) in place of
        their birth values; ``rest`` itself when the model tracks none."""
        return _with_stats(rest, state.get("stats"))


def _with_stats(rest: dict, stats: dict | None) -> dict:
    """``rest`` (a pure dict) with the leaves of ``stats`` (a pure dict of a subset of its
    paths) replaced."""
    if not stats:
        return rest
    out = dict(rest)
    for key, value in stats.items():
        out[key] = _with_stats(rest[key], value) if isinstance(value, dict) else value
    return out


def make_trainer(
    model_fn: Callable[[], nnx.Module], config, mesh, *, train_loss: Callable | None = None
) -> Trainer:
    """Build the sharded init, train and eval steps.

    Args:
      model_fn: zero-argument constructor of the model (called abstractly and under jit).
      config: a :class:`train.config.TrainConfig` (optimizer, dtype, grad_accum, remat, seed).
      mesh: a mesh with axes among data/fsdp/tensor.
      train_loss: the loss the train step minimises, ``(logits_BTV, targets_BT, weights_BT)
        -> (sum, weight)`` like :func:`token_loss_sums` (default), whose ratio is the reported
        ``loss``; e.g. LoKU's inverted hinge loss (``train.adapter_procedures``). Evaluation
        always reports the next-token NLL.

    Returns:
      A :class:`Trainer`.
    """
    mesh = auto_mesh(mesh)
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(model_fn)
    graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    abs_stats = _pure(nnx.state(abstract_model, nnx.BatchStat))  # {} unless a layer tracks one
    # a dim the mesh axes do not divide (one shared kv head on "tensor") stays replicated
    param_sh = _names_tree(abs_params, lambda n, shape: logical_sharding(n, mesh, shape=shape))
    replicated = NamedSharding(mesh, PartitionSpec())
    rest_sh = jax.tree.map(lambda _: replicated, _pure(abs_rest))
    infos = param_infos(abs_params)
    optimizer, trainable = make_optimizer(config, infos)
    abs_params = _pure(abs_params)
    abs_opt = jax.eval_shape(optimizer.init, split_params(abs_params, trainable)[0])
    state_sh = {
        "params": param_sh,
        "opt_state": _like_params(abs_opt, param_sh, infos, mesh),
        "step": replicated,
        "rng": replicated,
    }
    if abs_stats:
        state_sh["stats"] = jax.tree.map(lambda _: replicated, abs_stats)
    batch_sh = logical_sharding(("batch", "length"), mesh)
    micro_sh = NamedSharding(mesh, PartitionSpec(None, *logical_to_spec(("batch", "length"), mesh)))
    compute_dtype = jnp.dtype(config.compute_dtype)
    accum = config.grad_accum
    skip_nonfinite = config.nonfinite == "skip"

    def init():
        with nnx.use_eager_sharding(False):
            model = model_fn()
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params = _pure(params)
        key = jax.random.key_data(jax.random.key(config.seed))
        state = {
            "params": params,
            "opt_state": optimizer.init(split_params(params, trainable)[0]),
            "step": jnp.zeros((), jnp.int32),
            "rng": key,
        }
        if abs_stats:
            state["stats"] = _pure(nnx.state(model, nnx.BatchStat))
        return state, _pure(rest)

    def sums_of(loss):
        def sums(params, rest, batch, rng=None, frozen=None, stats=None):
            if frozen:  # differentiated w.r.t. the trainable part only
                params = merge_params(params, frozen)
            if compute_dtype != jnp.float32:  # bf16 compute, fp32 master weights
                params = jax.tree.map(
                    lambda p: (
                        p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
                    ),
                    params,
                )
            model = nnx.merge(graphdef, params, _with_stats(rest, stats))
            extras = {k: v for k, v in batch.items() if k not in _LOSS_KEYS}  # context fields
            logits_BTV = model(batch["inputs_BT"], rng=rng, **extras)
            total, weight = loss(logits_BTV, batch["targets_BT"], batch["weights_BT"])
            new_stats = _pure(nnx.state(model, nnx.BatchStat)) if stats else None
            # aux: None when no layer sows one; new_stats: the tracked statistics after this
            # forward (None when the model tracks none)
            return total, weight, pop_aux_loss(model), new_stats

        if config.remat == "full":
            return jax.checkpoint(sums, policy=jax.checkpoint_policies.nothing_saveable)
        return sums

    loss_sums = sums_of(token_loss_sums)  # evaluation: the next-token NLL
    train_sums = loss_sums if train_loss is None else sums_of(train_loss)
    aux_weight = config.aux_loss_weight

    def objective(*args):
        # layers' auxiliary losses (e.g. MoH load balance) enter per unit of token weight, so
        # after the division by the summed weight the objective is loss + w · aux
        total, weight, aux, stats = train_sums(*args)
        aux = jnp.zeros((), jnp.float32) if aux is None else aux
        stats = jax.lax.stop_gradient(stats)
        return total + aux_weight * aux * weight, (total, weight, aux * weight, stats)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state, rest, batch):
        # gradients, their norm and the optimizer see only the trainable leaves: frozen
        # weights enter as constants, so XLA computes no weight gradient for them
        params, frozen = split_params(state["params"], trainable)
        # a fresh key per step for the model's stochastic layers; [0] is carried to the next step
        step_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))[1]
        stats = state.get("stats")
        if accum == 1:
            (_, (nll, weight, aux, stats)), grads = grad_fn(
                params, rest, batch, step_key, frozen, stats
            )
        else:

            def split(x_BT):  # row r = b * accum + a goes to micro-batch a
                b, t = x_BT.shape
                x_ABT = x_BT.reshape(b // accum, accum, t).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x_ABT, micro_sh)

            def body(carry, micro_index):  # tracked statistics update micro-batch by micro-batch
                sums, stats = carry
                micro, a = micro_index
                key = jax.random.fold_in(step_key, a)
                (_, (nll, weight, aux, stats)), grads = grad_fn(
                    params, rest, micro, key, frozen, stats
                )
                return (jax.tree.map(jnp.add, sums, (nll, weight, aux, grads)), stats), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
            zeros += (jax.tree.map(jnp.zeros_like, params),)
            xs = (jax.tree.map(split, batch), jnp.arange(accum))
            ((nll, weight, aux, grads), stats), _ = jax.lax.scan(body, (zeros, stats), xs)
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        loss, grad_norm = nll / weight, optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
        if skip_nonfinite:  # a non-finite step changes nothing but the step and the RNG
            keep = lambda new, old: jnp.where(finite, new, old)
            new_params = jax.tree.map(keep, new_params, params)
            opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
            if stats:
                stats = jax.tree.map(keep, stats, state["stats"])
        new_state = {
            "params": merge_params(new_params, frozen),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0]),
        }
        if stats:
            new_state["stats"] = stats
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "aux_loss": aux / weight,  # token-weighted mean of the layers' auxiliary losses
            "tokens": jnp.float32(batch["inputs_BT"].size),
            "finite": finite,
        }
        return new_state, metrics

    def eval_step(params, rest, batch):  # tracked statistics: those in rest (with_stats)
        return loss_sums(params, rest, batch)[:2]

    def train_steps(state, rest, batches):
        return jax.lax.scan(lambda s, batch: train_step(s, rest, batch), state, batches)

    abstract_state = {
        "params": abs_params,
        "opt_state": abs_opt,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    if abs_stats:
        abstract_state["stats"] = abs_stats
    return Trainer(
        graphdef=graphdef,
        mesh=mesh,
        optimizer=optimizer,
        state_shardings=state_sh,
        rest_shardings=rest_sh,
        batch_sharding=batch_sh,
        abstract_state=abstract_state,
        abstract_rest=_pure(abs_rest),
        init=jax.jit(init, out_shardings=(state_sh, rest_sh)),
        train_step=jax.jit(
            train_step,
            in_shardings=(state_sh, rest_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            eval_step, in_shardings=(param_sh, rest_sh, batch_sh), out_shardings=replicated
        ),
        train_steps=jax.jit(
            train_steps,
            in_shardings=(state_sh, rest_sh, micro_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        ),
        steps_sharding=micro_sh,
        trainable=frozenset(trainable),
        param_infos=infos,
    )
