"""Selective Self-Attention (SSA, Zhang et al. 2024, arXiv 2411.12892): the ``"ssa"`` kind.

SSA gives each query its own inverse temperature τ_q, a function of the query token and of
its position, and each value a temperature τ_v (paper §3: query-, position- and value-
selectivity; weight sharing keeps the new parameters small):

    logits_n[t, s] = τ_q,n(x_t, t) · ⟨q_n(x_t), k(x_s)⟩ · scale
    τ_q,n(x_t, t)  = tanh(u · q_n(x_t)) + 1 + exp(-exp(β)) · log(t + 1)   (token + position)
    v'(x_s)        = τ_v,k(x_s) · v_k(x_s),   τ_v,k(x_s) = 1 + tanh(w · v_k(x_s))

The token terms share the q / v projections (the paper's weight sharing: f(x) = uᵀ W_q x, so
the new parameters are u [H] and w [V], one of each per layer, and the scalar β per layer; a
few hundred parameters, far below the paper's 0.5% bound). Position t is ``ctx.positions_BT``
(absolute, 0-based), so log(t + 1) is the log of the number of keys a causal query sees: the
paper's counter to attention dilution in long contexts.

The position term follows the authors' code (github.com/umich-sota/selective_attention,
``lit_gpt/gpt_2_PTS.py``, read only): logits are multiplied by 1 + exp(-exp(β)) · log(n) with
n = t + 1 the query's row length, one learnable scalar β per layer initialised to 1.5
(``position_beta_init``; their fine-tuning variant ``model_finetune_att.py`` starts at 2.0).
The double exponential keeps the coefficient in (0, 1) and positive for any β, so the position
term never makes τ_q negative; τ_q > 0 always (tanh > -1). That code has the position term only;
the token (tanh) term and the value temperature follow the paper's description and add to /
multiply as above (u = w = 0 at birth: both exactly 1). Consequences: a fresh SSA layer is not
exactly MHA (its position coefficient is exp(-exp(1.5)) ≈ 0.0114, sharpening later rows a
little, as in the authors' pretraining); with β large (e.g. 10: exp(-exp(10)) underflows to 0
in fp32) and u = w = 0 it is exactly the "mha" layer with the same q/k/v/o parameters.

Stages: ``qk_transform`` computes τ_q from the raw query (before qk-norm and RoPE, which it
then applies) and scales q by it, which is exactly a per-query logit scale, so every
backend of the op (xla, chunked, the Pallas kernels) and the decode caches serve SSA
unchanged; τ_v scales v there too (it depends only on the value's own token, so the cache
stores scaled values). Everything else is the "mha" kind's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import _validate as val
from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._base import param
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import register_kind

__all__ = ["SSAConfig", "SelectiveAttention", "ssa_temperatures"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSAConfig(AttentionConfig):
    """:class:`AttentionConfig` plus SSA's temperatures (the ``"ssa"`` kind).

    Attributes:
      query_temperature: the token-dependent query term tanh(u · q) (parameter u [H]).
      position_temperature: the position term exp(-exp(β)) · log(t + 1) (scalar β).
      position_beta_init: β at birth; the authors' 1.5 (coefficient exp(-exp(1.5)) ≈ 0.0114).
        A large β (10) switches the term off exactly (the coefficient underflows to 0).
      value_temperature: the value temperature 1 + tanh(w · v) (parameter w [V]).
    """

    kind: ClassVar[str] = "ssa"

    query_temperature: bool = True
    position_temperature: bool = True
    position_beta_init: float = 1.5
    value_temperature: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("query_temperature", "position_temperature", "value_temperature"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"{type(self).__name__}.{name}={getattr(self, name)!r} must be a bool"
                )
        beta = val.check_float(
            type(self).__name__, "position_beta_init", self.position_beta_init, positive=False
        )
        if not math.isfinite(beta):
            raise ValueError(
                f"{type(self).__name__}.position_beta_init={beta} must be finite (the "
                "position temperature is 1 + exp(-exp(β))·log(t + 1))"
            )

    @property
    def num_extra_params(self) -> int:
        """SSA's parameters beyond the "mha" layer's: H + 1 + V (those switched on)."""
        c = self
        return c.query_temperature * c.h + c.position_temperature + c.value_temperature * c.v

    def build(self, *, rngs: nnx.Rngs) -> SelectiveAttention:
        """The :class:`SelectiveAttention` module of this config."""
        return SelectiveAttention(self, rngs=rngs)


register_kind("ssa", SSAConfig)


def ssa_temperatures(q_BTNH, v_BTKV, positions_BT, u_H=None, beta=None, w_V=None):
    """SSA's query and value temperatures (module docstring), in fp32.

    Args:
      q_BTNH: raw queries (before qk-norm / RoPE); v_BTKV: values (None: no τ_v).
      positions_BT: absolute 0-based positions t.
      u_H, beta, w_V: the temperature parameters (u [H], scalar β, w [V]; None: that term off).

    Returns:
      (tau_BTN, tau_v_BTK): the per-query logit scale and the per-value scale (None when the
      value temperature is off).
    """
    b, t, n, _ = q_BTNH.shape
    tau_BTN = jnp.ones((b, t, n), jnp.float32)
    if u_H is not None:
        tau_BTN += jnp.tanh(jnp.einsum("btnh,h->btn", q_BTNH.astype(jnp.float32), u_H))
    if beta is not None:
        # the authors' coefficient exp(-exp(β)) in (0, 1): positive for any β; log(n), n = t + 1
        coef = jnp.exp(-jnp.exp(jnp.asarray(beta, jnp.float32)))
        tau_BTN += coef * jnp.log1p(positions_BT.astype(jnp.float32))[..., None]
    tau_v_BTK = None
    if w_V is not None and v_BTKV is not None:
        tau_v_BTK = 1 + jnp.tanh(jnp.einsum("btkv,v->btk", v_BTKV.astype(jnp.float32), w_V))
    return tau_BTN, tau_v_BTK


class SelectiveAttention(Attention):
    """MHA / GQA with SSA's query, position and value temperatures (the ``"ssa"`` kind).

    Parameters: those of :class:`Attention` plus ``tau_u`` [H] (head_dim, zero at birth),
    ``tau_beta`` (a scalar, ``position_beta_init`` at birth) and ``tau_w`` [V] (head_dim, zero).
    """

    def __init__(self, config: SSAConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config

        def zeros(n, axis):
            return param(rngs, (n,), (axis,), init=jax.nn.initializers.zeros, dtype=c.param_dtype)

        if c.query_temperature:
            self.tau_u = zeros(c.h, "head_dim")
        if c.position_temperature:
            init = jax.nn.initializers.constant(c.position_beta_init)
            self.tau_beta = param(rngs, (), (), init=init, dtype=c.param_dtype)
        if c.value_temperature:
            self.tau_w = zeros(c.v, "head_dim")

    def temperatures(self, q_BTNH, v_BTKV, ctx: Context):
        """(tau_BTN, tau_v_BTK or None) of raw queries and values (:func:`ssa_temperatures`)."""
        c = self.config
        return ssa_temperatures(
            q_BTNH,
            v_BTKV,
            ctx.positions_BT,
            self.tau_u[...] if c.query_temperature else None,
            self.tau_beta[...] if c.position_temperature else None,
            self.tau_w[...] if c.value_temperature else None,
        )

    def qk_transform(self, q_BTNH, kv, ctx: Context):
        """τ_q from the raw q; qk-norm and RoPE (the "mha" stage); q · τ_q and v · τ_v."""
        tau_BTN, tau_v_BTK = self.temperatures(q_BTNH, kv[1], ctx)
        q_BTNH, (k_BTKH, v_BTKV) = super().qk_transform(q_BTNH, kv, ctx)
        q_BTNH = q_BTNH * tau_BTN[..., None].astype(q_BTNH.dtype)
        if tau_v_BTK is not None:
            v_BTKV = v_BTKV * tau_v_BTK[..., None].astype(v_BTKV.dtype)
        return q_BTNH, (k_BTKH, v_BTKV)
