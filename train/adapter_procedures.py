"""Adapter training procedures as optimizer factories (``TrainConfig.optimizer`` rule names).

Where a low-rank method's training procedure is part of the method, the procedure is an optax
transform registered here under the method's name, and the method's
``MethodConfig.training_rules()`` names it, so ``python -m train.finetune --adapter sora``
runs it with no further flag (rules given with ``--set optimizer=...`` are used as they are).
A factory takes the parameters its rule selected (``train.optim.ParamInfo`` each) and the
train config, like every factory in :mod:`train.optimizers`; unset hyper-parameters come from
the train config. A procedure that changes what the forward reads (a rank mask, a pruning
mask) keeps that state in adapter leaves and writes it through its updates.

  sora(lam, lr, b1, b2, weight_decay, sticky)   SoRA: AdamW on the adapter, then the proximal
                                                 L1 step on its gates with threshold λ·η(t)

Where the procedure is more than an optimizer (an initialisation from the trained base, a
different training loss, a pruned copy to train on), the method registers
:class:`LoopCallbacks` here, which ``train.finetune`` runs around the loop:

  lorasb   prepare: a, r, b from the SVD of the first full update (base gradient, 4 batches)
  loku     prepare: FILA from the relative Fisher (forget = training data, ``retain_data``);
           train_loss: the inverted hinge loss
  loram    shrink: the L2-pruned copy to train on; finish: LoRA recovered onto the original
  lora with init=pissa|olora   prepare: the adapter re-applied on the loaded base
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train.config import ConfigError
from train.optim import lr_schedule, register_optimizer
from train.optimizers import adamw

__all__ = ["sora", "increlora", "loraprune", "LoopCallbacks", "register_callbacks", "callbacks_for"]


def sora(params, config, *, lam, lr=None, b1=None, b2=None, weight_decay=None, sticky=True):
    """SoRA (``jaxattn.lowrank.methods.sora``): the official code's SparseAdamW, an AdamW step
    on every adapter leaf followed by ``sora_proximal`` on the gates at the same rate η(t)."""
    from jaxattn.lowrank.methods.sora import sora_proximal

    inner = adamw(params, config, lr=lr, b1=b1, b2=b2, weight_decay=weight_decay)
    return optax.chain(inner, sora_proximal(lam, lr_schedule(config, lr), sticky=sticky))


register_optimizer("sora", sora)


# --- IncreLoRA and LoRAPrune (jaxattn.lowrank.methods.increlora / .loraprune) ---------------
#   increlora(target_rank, add_rank, interval, warmup, top_h, beta1, beta2, lr, b1, b2,
#             weight_decay)   AdamW on the adapter inside the importance-driven rank growth
#   loraprune(ratio, init_ratio, warmup, cooldown, every, beta, lr, b1, b2, weight_decay)
#             AdamW on the adapter inside the iterative head/channel pruning over the
#             config's ``steps``


def increlora(params, config, *, target_rank, add_rank, interval, warmup=0, top_h=1,
              beta1=0.85, beta2=0.85, lr=None, b1=None, b2=None, weight_decay=None):  # fmt: skip
    """IncreLoRA: ``increlora_procedure`` around AdamW on every adapter leaf the rule took."""
    from jaxattn.lowrank.methods.increlora import increlora_procedure

    inner = adamw(params, config, lr=lr, b1=b1, b2=b2, weight_decay=weight_decay)
    return increlora_procedure(
        inner, target_rank=target_rank, add_rank=add_rank, interval=interval, warmup=warmup,
        top_h=top_h, beta1=beta1, beta2=beta2,
    )  # fmt: skip


def loraprune(params, config, *, ratio=0.5, init_ratio=0.0, warmup=0.1, cooldown=0.1,
              every=10, beta=0.9, lr=None, b1=None, b2=None, weight_decay=None):  # fmt: skip
    """LoRAPrune: ``loraprune_procedure`` around AdamW, its schedule over ``config.steps``."""
    from jaxattn.lowrank.methods.loraprune import loraprune_procedure

    inner = adamw(params, config, lr=lr, b1=b1, b2=b2, weight_decay=weight_decay)
    return loraprune_procedure(
        inner, total_steps=int(config.steps), ratio=ratio, init_ratio=init_ratio,
        warmup=warmup, cooldown=cooldown, every=every, beta=beta,
    )  # fmt: skip


register_optimizer("increlora", increlora)
register_optimizer("loraprune", loraprune)


# --- Train-loop callbacks: procedures that are more than an optimizer rule -------------------


@dataclasses.dataclass(frozen=True)
class LoopCallbacks:
    """What ``train.finetune`` runs around the loop for one method (all optional).

    Attributes:
      shrink: ``(model, method, config) -> (model to train, token)`` on the loaded base before
        anything else (LoRAM: the pruned copy); deterministic, since resuming repeats it.
      prepare: ``(model, batches, method, config) -> None``, on the model holding the loaded
        (shrunk) base and its fresh adapter: initialise from the trained base and the host
        ``batches`` (the run's first ``calibration`` training batches): LoRA-SB's gradient
        SVD, FILA, PiSSA / OLoRA. What it leaves (adapter leaves and any base leaf it rewrites)
        is the run's starting point; a resumed run and ``train.sample`` repeat it, and the base
        digest in every checkpoint says whether it reproduced.
      calibration: how many training batches ``prepare`` receives (a method field name whose
        value is the count, or an int).
      train_loss: the train step's loss (``train.step.make_trainer``'s ``train_loss``).
      finish: ``(trained model, token, method, config) -> model``: the model whose adapter is
        written to ``<run>/adapter`` (LoRAM: the adapter recovered onto the original model).
    """

    shrink: Callable | None = None
    prepare: Callable | None = None
    calibration: int | str = 0
    train_loss: Callable | None = None
    finish: Callable | None = None

    def batches(self, method) -> int:
        n = self.calibration
        return int(getattr(method, n) if isinstance(n, str) else n)


_CALLBACKS: dict[str, LoopCallbacks] = {}


def register_callbacks(method: str, callbacks: LoopCallbacks) -> None:
    """Register the train-loop callbacks of adapter method ``method`` (one set per method)."""
    if method in _CALLBACKS and _CALLBACKS[method] != callbacks:
        raise ValueError(f"train-loop callbacks for {method!r} are already registered")
    _CALLBACKS[method] = callbacks


def callbacks_for(method) -> LoopCallbacks:
    """The callbacks of a method config (``lowrank.make_method``); none for most methods. A
    ``lora`` adapter with a base-rewriting init (PiSSA, OLoRA) is re-applied on the loaded base."""
    if getattr(method, "init", None) in ("pissa", "olora") and method.method == "lora":
        return LoopCallbacks(prepare=_reapply)
    return _CALLBACKS.get(method.method, LoopCallbacks())


def _adapter_name(config) -> str:
    from train.adapters import adapter_config

    return adapter_config(config).name


def _mean_nll(model, batch) -> jax.Array:
    from train.step import token_loss_sums

    logits = model(jnp.asarray(batch["inputs_BT"]))
    total, weight = token_loss_sums(
        logits, jnp.asarray(batch["targets_BT"]), jnp.asarray(batch["weights_BT"])
    )
    return total / jnp.maximum(weight, 1.0)


def _reapply(model, batches, method, config) -> None:
    """PiSSA / OLoRA: the adapter built on the abstract base is rebuilt on the loaded one."""
    from jaxattn import lowrank
    from train.adapters import attach_adapter

    lowrank.remove(model, _adapter_name(config))
    attach_adapter(model, config)


def _lorasb_prepare(model, batches, method, config) -> None:
    """LoRA-SB: a, r, b from the truncated SVD of the first full update, estimated from the
    base's NLL gradient over the calibration batches (``lowrank.methods.lorasb``)."""
    from jaxattn.lowrank.methods.lorasb import lora_sb_init

    lora_sb_init(model, _mean_nll, list(batches), name=_adapter_name(config))


def _rows(batches):
    """Each sequence of the batches as its own one-row batch (a per-example Fisher)."""
    for batch in batches:
        for i in range(batch["inputs_BT"].shape[0]):
            yield {k: v[i : i + 1] for k, v in batch.items()}


@functools.partial(jax.jit, static_argnums=0)
def _nll_grad(graphdef, kernels, rest, batch):
    """∂(mean NLL)/∂kernels, compiled once per model structure (the Fisher of the forget and
    retain sets, in a run and again on resume or in ``train.sample``, share it)."""
    return jax.grad(lambda ks: _mean_nll(nnx.merge(graphdef, ks, rest), batch))(kernels)


def _fisher(model, paths, batches) -> dict:
    """Empirical Fisher of the mean NLL w.r.t. the base kernels at ``paths`` ([*in, *out])."""
    from jaxattn.lowrank._surgery import per_kernel, split_kernels
    from jaxattn.lowrank.loku import empirical_fisher

    graphdef, kernels, rest = split_kernels(model, paths)
    grad_fn = lambda ks, batch: _nll_grad(graphdef, ks, rest, batch)  # noqa: E731
    fisher = empirical_fisher(None, kernels, _rows(batches), grad_fn=grad_fn)
    return per_kernel(model, fisher, paths)


def _loku_prepare(model, batches, method, config) -> None:
    """LoKU's FILA: F̂ = F_forget / (F_retain + eps) on every adapted kernel, the factors and
    residual base written by ``lowrank.loku.fila_init`` (the forget set: the training data)."""
    from jaxattn.lowrank import _apply
    from jaxattn.lowrank.loku import fila_init, relative_fisher
    from train.data import WindowLoader, load_tokens

    name = _adapter_name(config)
    paths = sorted(_apply.holding(model, name, op="loku"))
    forget = _fisher(model, paths, batches)
    if method.retain_data:
        try:
            tokens = load_tokens(method.retain_data)
        except (OSError, ValueError) as err:
            raise ConfigError(f"adapter.retain_data={method.retain_data!r}: {err}") from None
        loader = WindowLoader(tokens, seq_len=config.seq_len, global_batch=config.batch_size)
        retain = _fisher(model, paths, [loader.batch(i) for i in range(method.fisher_batches)])
    else:  # no retain set: F_r = 1
        retain = {p: jnp.ones_like(f) for p, f in forget.items()}
    fila_init(model, relative_fisher(forget, retain), name=name)


def _ihl_sums(logits_BTV, targets_BT, weights_BT):
    """LoKU's inverted hinge loss as (sum, weight) over the weighted tokens."""
    from jaxattn.lowrank.loku import inverted_hinge_loss

    weight = jnp.sum(weights_BT.astype(jnp.float32))
    return inverted_hinge_loss(logits_BTV, targets_BT, weights_BT) * weight, weight


def _loram_shrink(model, method, config):
    from jaxattn.lowrank.loram import l2_plan, prune_model

    try:
        plan = l2_plan(model, kv_keep=method.kv_keep, mlp_keep=method.mlp_keep)
        return prune_model(model, plan), (model, plan)
    except ValueError as err:
        raise ConfigError(f"adapter 'loram': {err}") from None


def _loram_finish(trained, token, method, config):
    """The LoRA trained on the pruned copy, recovered onto the original model."""
    from jaxattn.lowrank.loram import recover

    full, plan = token
    recover(trained, full, plan, name=_adapter_name(config))
    return full


register_callbacks("lorasb", LoopCallbacks(prepare=_lorasb_prepare, calibration=4))
register_callbacks(
    "loku",
    LoopCallbacks(prepare=_loku_prepare, calibration="fisher_batches", train_loss=_ihl_sums),
)
register_callbacks("loram", LoopCallbacks(shrink=_loram_shrink, finish=_loram_finish))
