"""Perturbed grouped-query attention (PGQA; Khan et al. 2024, arXiv 2408.08454): ``"pgqa"``.

Uniform GQA (N query heads in groups of N / K per kv head) whose per-head outputs have a noise
subtracted, a noise with the output's own first two moments:

    o_n[t]     = attention output of query head n at token t       [V]
    z_n[t]     = (u - mean(u)) / std(u),   u ~ U[0, 1)^V           (standardised uniform noise)
    noise_n[t] = z_n[t] · std(o_n[t]) + mean(o_n[t])                (moments over the V entries)
    o'_n[t]    = o_n[t] - noise_n[t]

std is the unbiased (ddof = 1) estimate in both places, so noise_n[t] has exactly the mean and
std of o_n[t]; a row u with std 0 is divided by 1 instead, and a constant row o (a fully masked
query's zeros) gets noise = its constant, so o' = 0, with a finite (zero-std) gradient. The
moments are not stopped: the gradient flows through them as in the reference. The perturbation
sits in the ``head_gate`` stage, after the op, so every backend and cache serves PGQA unchanged.

Checked against the authors' code (github.com/zohaib-khan5040/key-driven-gqa,
``modules/attention/pgqa.py``, read only): uniform groups, noise subtracted from each group's
attention output (weights @ v), uniform ``rand`` noise standardised per row and rescaled to the
row's mean and unbiased std. Adapted for a causal LM, not as there:

1. per-token statistics: the reference's row is a query head's whole output flattened over
   patches and head dims [T·V], so a token's noise would depend on later tokens' outputs; here
   the row is one token's head output [V] (causal, and decode == forward);
2. training only: the reference perturbs in every forward, eval included; here the noise needs
   ``ctx.rng`` (the train step's key) and is off in evaluation, generation and cache steps, so
   an evaluated PGQA layer is the "mha" (GQA) layer with the same parameters, bitwise;
3. fresh noise per batch row (the reference draws one [G, T·V] matrix shared by the batch) and
   no zeroed "diagonal" (the reference zeroes entry i of query head i's flattened row, i.e. G
   entries of the first patch, before standardising; a sparsification with no per-token
   counterpart).

Note the subtraction removes each row's mean (mean(o') = 0) and, the noise being independent of
o, roughly doubles its variance: a strong regulariser, in training only here.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import register_kind

__all__ = ["PGQAConfig", "PerturbedAttention", "pgqa_noise"]

_NOISE_TAG = 3  # ctx.key site of the perturbation (dropout uses 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PGQAConfig(AttentionConfig):
    """:class:`AttentionConfig` (uniform GQA) with PGQA's training perturbation (``"pgqa"``)."""

    kind: ClassVar[str] = "pgqa"

    def __post_init__(self):
        super().__post_init__()
        if self.v < 2:
            raise ValueError(
                f"{type(self).__name__}: v_head_dim={self.v} must be >= 2 (the noise is "
                "standardised over a head's V entries with the unbiased std)"
            )

    def build(self, *, rngs: nnx.Rngs) -> PerturbedAttention:
        """The :class:`PerturbedAttention` module of this config."""
        return PerturbedAttention(self, rngs=rngs)


register_kind("pgqa", PGQAConfig)


def pgqa_noise(o_BTNV: jax.Array, key: jax.Array) -> jax.Array:
    """PGQA's noise for the head outputs ``o_BTNV`` (module docstring), fp32 [B, T, N, V].

    Args:
      o_BTNV: per-head attention outputs.
      key: a PRNG key.

    Returns:
      noise with, per (b, t, n) row, the row's mean and unbiased std of ``o_BTNV``.
    """
    u = jax.random.uniform(key, o_BTNV.shape, jnp.float32)
    u_std = jnp.std(u, -1, keepdims=True, ddof=1)
    z = (u - jnp.mean(u, -1, keepdims=True)) / jnp.where(u_std == 0, 1.0, u_std)
    o = o_BTNV.astype(jnp.float32)
    mean = jnp.mean(o, -1, keepdims=True)
    var = jnp.sum(jnp.square(o - mean), -1, keepdims=True) / (o.shape[-1] - 1)
    # a constant row (a fully masked query's zeros): std 0 with a zero gradient, not sqrt'(0)
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    return z * std + mean


class PerturbedAttention(Attention):
    """GQA with PGQA's output perturbation in training (the ``"pgqa"`` kind; module docstring).

    Parameters: those of :class:`Attention` (none added).
    """

    def head_gate(self, o_BTNV: jax.Array, ctx: Context, x_BTD: jax.Array | None = None):
        """o - noise in training (``ctx.rng`` set, not a cache step); o itself otherwise."""
        key = None if ctx.decoding else ctx.key(_NOISE_TAG)
        if key is None:
            return o_BTNV
        return (o_BTNV.astype(jnp.float32) - pgqa_noise(o_BTNV, key)).astype(o_BTNV.dtype)
