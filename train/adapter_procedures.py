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
"""

from __future__ import annotations

import optax

from train.optim import lr_schedule, register_optimizer
from train.optimizers import adamw

__all__ = ["sora"]


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
