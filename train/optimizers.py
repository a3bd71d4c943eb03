"""The built-in optimizer factories of ``TrainConfig.optimizer`` rules (see ``train.optim``).

Each is ``factory(params: dict[str, ParamInfo], config, **kwargs)`` returning an optax
transform over the parameters its rule took; unset hyperparameters come from the train config
(``lr`` with its warmup + cosine schedule, ``b1``, ``b2``, ``weight_decay``). Weight decay
applies to matrices only (parameters with >= 2 dims), never to norms' scales or biases.

  adamw(lr, b1, b2, eps, weight_decay)          optax.adamw
  lion(lr, b1, b2, weight_decay)                optax.lion (b1/b2 default 0.9/0.99)
  sgd(lr, momentum, nesterov)                   optax.sgd
  frozen                                        no gradient, no state (trains=False)
  galore(rank, update_proj_gap, scale, proj_type, projector, moment_bits, lr, b1, b2,
         weight_decay)                          jaxattn.optim.galore around galore-torch's Adam
  fira(..., gamma)                              jaxattn.optim.fira, same arguments + gamma
  sst(rank, every, svd_every, lr, b1, b2, eps, weight_decay, uniform_mix, enhanced_grad,
      normalize, clamp_s)                       AdamW with Sparse Spectral
                                                Training's sampled singular vectors and periodic
                                                re-SVD (jaxattn.optim.sst) on the ``u``/``s``/``vt``
                                                leaves of sst kernels
  refactor(every, lr, b1, b2, eps, weight_decay)    AdamW with weight refactorisation +
                                                momentum reset every ``every`` steps
                                                (jaxattn.optim.lowrank_refactor) on ``b``/``a``

``sst`` and ``refactor`` train the factorised kernels of ``--set model.parameterization=sst``
/ ``lowrank`` (or ``sltrain``): the sampling and the refactorisation run inside the compiled
step. A rule of theirs that takes no spectral triple / factor pair is refused; spectral
kernels trained by another rule (``adamw:.*`` alone) get a warning naming the missing ``sst``
rule (they would train as plain factors: no sampling, no re-SVD, U and V drifting from
orthonormal).

GaLore and Fira view each parameter as the matrix ``[fan_in, fan_out]`` from its
:class:`train.optim.ParamInfo` (``Linear`` kernels record their fan-in axes), project the ones
with >= 2 dims at ``rank`` and update the others with plain Adam. A rank larger than the
smaller side of a matrix the rule takes is refused (a ``config error`` naming the rule and the
parameter), as are ``update_proj_gap <= 0`` and an unknown ``proj_type`` or ``projector``.
"""

from __future__ import annotations

import math
import warnings

import jax
import optax

from train.optim import (
    ParamInfo,
    lr_schedule,
    path_string,
    register_optimizer,
    register_rule_check,
)

__all__ = ["adamw", "lion", "sgd", "frozen", "galore", "fira", "sst", "refactor"]


def _decay_mask(params: dict[str, ParamInfo]):
    """``params_tree -> bool tree``: True on matrices (decayed), False on vectors/scalars."""
    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: params[path_string(path)].ndim >= 2, tree
    )


def adamw(params, config, *, lr=None, b1=None, b2=None, eps=1e-8, weight_decay=None):
    """AdamW (optax) with the config's schedule, betas and decay unless given."""
    return optax.adamw(
        lr_schedule(config, lr),
        b1=config.b1 if b1 is None else b1,
        b2=config.b2 if b2 is None else b2,
        eps=eps,
        weight_decay=config.weight_decay if weight_decay is None else weight_decay,
        mask=_decay_mask(params),
    )


def lion(params, config, *, lr=None, b1=0.9, b2=0.99, weight_decay=None):
    """Lion (optax); its lr is usually 3-10x smaller than AdamW's."""
    return optax.lion(
        lr_schedule(config, lr),
        b1=b1,
        b2=b2,
        weight_decay=config.weight_decay if weight_decay is None else weight_decay,
        mask=_decay_mask(params),
    )


def sgd(params, config, *, lr=None, momentum=0.0, nesterov=False):
    """SGD (optax) with optional (Nesterov) momentum; no weight decay."""
    return optax.sgd(lr_schedule(config, lr), momentum=momentum or None, nesterov=nesterov)


def frozen(params, config):
    """Parameters that do not train (never called: registered with ``trains=False``)."""
    raise AssertionError("frozen parameters get no optimizer")  # pragma: no cover


def _projected(which, params, config, rank, lr, b1, b2, weight_decay, **kwargs):
    from jaxattn.optim import scale_by_adam_galore_torch

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank={rank!r} must be a positive int")

    sides = {p: (i.fan_in, math.prod(i.shape[i.fan_in_axes :])) for p, i in params.items()
             if i.ndim >= 2}  # fmt: skip
    # refused, not clipped: at rank == min(m, n) the projector is square, so a clipped leaf
    # would silently train as full-rank Adam scaled by `scale`
    too_big = {p: mn for p, mn in sides.items() if rank > min(mn)}
    if too_big:
        path, (m, n) = next(iter(too_big.items()))
        raise ValueError(
            f"rank={rank} is larger than the smaller side of {len(too_big)} matrices it takes, "
            f"e.g. {path!r} viewed as [{m}, {n}] (rank <= {min(m, n)}); lower the rank or "
            "narrow the rule's regex"
        )

    def leaf_rank(path, shape):
        return rank if path in sides else None

    inner = scale_by_adam_galore_torch(
        config.b1 if b1 is None else b1, config.b2 if b2 is None else b2
    )
    return optax.chain(
        which(inner, rank=leaf_rank, fan_in_axes=lambda p, s: params[p].fan_in_axes, **kwargs),
        optax.add_decayed_weights(
            config.weight_decay if weight_decay is None else weight_decay, _decay_mask(params)
        ),
        optax.scale_by_learning_rate(lr_schedule(config, lr)),
    )


def galore(
    params, config, *, rank, update_proj_gap=200, scale=0.25, proj_type="std",
    projector="svd", moment_bits=32, lr=None, b1=None, b2=None, weight_decay=None,
):  # fmt: skip
    """GaLore (``jaxattn.optim.galore``) around galore-torch's Adam, then decay and lr."""
    from jaxattn.optim import galore as galore_tx

    return _projected(
        galore_tx, params, config, rank, lr, b1, b2, weight_decay,
        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
        projector=projector, moment_bits=moment_bits,
    )  # fmt: skip


def fira(
    params, config, *, rank, update_proj_gap=200, scale=0.25, gamma=1.01, proj_type="std",
    projector="svd", moment_bits=32, lr=None, b1=None, b2=None, weight_decay=None,
):  # fmt: skip
    """Fira (``jaxattn.optim.fira``): GaLore plus the scaled, limited residual."""
    from jaxattn.optim import fira as fira_tx

    return _projected(
        fira_tx, params, config, rank, lr, b1, b2, weight_decay,
        update_proj_gap=update_proj_gap, scale=scale, gamma=gamma, proj_type=proj_type,
        projector=projector, moment_bits=moment_bits,
    )  # fmt: skip


def _siblings(params: dict[str, ParamInfo], names: tuple[str, ...]) -> dict[str, tuple]:
    """Parent path -> the shapes of its leaves ``names`` (parents that have all of them)."""
    leaves = {p.rpartition("/")[::2]: i.shape for p, i in params.items()}
    parents = {parent for parent, name in leaves if name == names[0]}
    return {
        p: tuple(leaves[(p, n)] for n in names)
        for p in sorted(parents)
        if all((p, n) in leaves for n in names)
    }


def _positive(**values):
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key}={value!r} must be a positive int")


def sst(params, config, *, rank, every=100, svd_every=None, lr=None, b1=None, b2=None,
        eps=1e-8, weight_decay=None, uniform_mix=0.5, enhanced_grad=True, normalize=True,
        clamp_s=True):  # fmt: skip
    """AdamW whose spectral kernels train by Sparse Spectral Training (``jaxattn.optim.sst``):
    every ``every`` steps ``rank`` singular-vector pairs are drawn per kernel, every
    ``svd_every`` steps (None: one round, ``every · ceil(k / rank)``) each kernel is
    re-initialised from the SVD of its merged weight. ``uniform_mix``, ``enhanced_grad``,
    ``normalize`` and ``clamp_s`` are ``jaxattn.optim.sst``'s (the paper's defaults)."""
    from jaxattn.optim import sst as sst_tx

    _positive(rank=rank, every=every)
    if svd_every is not None:
        _positive(svd_every=svd_every)
        if svd_every % every:
            raise ValueError(f"svd_every={svd_every} must be a multiple of every={every}")
    triples = _siblings(params, ("u", "s", "vt"))
    if not triples:
        raise ValueError(
            "takes no sst kernel (u/s/vt leaves); set model.parameterization=sst or narrow "
            "the rule to the parameterised projections"
        )
    too_big = {p: shapes[1][0] for p, shapes in triples.items() if rank > shapes[1][0]}
    if too_big:
        path, k = next(iter(too_big.items()))
        raise ValueError(f"rank={rank} is larger than the spectrum k={k} of {path!r}")
    inner = adamw(params, config, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return sst_tx(
        inner, rank=rank, every=every, svd_every=svd_every, seed=config.seed,
        uniform_mix=uniform_mix, enhanced_grad=enhanced_grad, normalize=normalize,
        clamp_s=clamp_s,
    )  # fmt: skip


def _spectral_needs_sst(trained: dict[str, str]) -> None:
    """Warn when a spectral kernel's ``u``/``s``/``vt`` train under a rule other than ``sst``."""
    leaves = {tuple(p.rpartition("/")[::2]): rule for p, rule in trained.items()}
    kernels = {
        parent: rule
        for (parent, name), rule in leaves.items()
        if name == "u" and (parent, "s") in leaves and (parent, "vt") in leaves
    }
    other = {parent: rule for parent, rule in kernels.items() if rule != "sst"}
    if other:
        parent, rule = next(iter(other.items()))
        warnings.warn(
            f"model.parameterization=sst: {len(other)} spectral kernels (e.g. {parent!r}) are "
            f"trained by the {rule!r} rule, not the 'sst' optimizer rule: no sampled "
            "singular-vector updates and no periodic re-SVD, so U and V drift from "
            "orthonormal. Add an sst rule before the catch-all, e.g. "
            'optimizer=("sst(rank=16,every=100):/attn/", "adamw:.*")',
            UserWarning,
            stacklevel=2,
        )


def refactor(params, config, *, every=100, lr=None, b1=None, b2=None, eps=1e-8,
             weight_decay=None):  # fmt: skip
    """AdamW with weight refactorisation + momentum reset of the ``b``/``a`` factor pairs every
    ``every`` steps (``jaxattn.optim.lowrank_refactor``; the lr schedule carries on)."""
    from jaxattn.optim import lowrank_refactor

    _positive(every=every)
    if not _siblings(params, ("b", "a")):
        raise ValueError(
            "takes no factor pair (b/a leaves); set model.parameterization=lowrank (or "
            "sltrain) or narrow the rule to the parameterised projections"
        )
    inner = adamw(params, config, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return lowrank_refactor(inner, every=every)


for _name, _fn in (("adamw", adamw), ("lion", lion), ("sgd", sgd), ("galore", galore),
                   ("fira", fira), ("sst", sst), ("refactor", refactor)):  # fmt: skip
    register_optimizer(_name, _fn)
register_optimizer("frozen", frozen, trains=False)
register_rule_check(_spectral_needs_sst)

import train.adapter_procedures  # noqa: E402,F401 - registers the adapter procedures
