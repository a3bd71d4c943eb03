"""Selective Self-Attention (SSA, Zhang et al. 2024, arXiv 2411.12892): the ``"ssa"`` kind.

SSA gives each query its own inverse temperature τ_q, a function of the query token and of
its position, and each value a temperature τ_v (paper §3: query-, position- and value-
selectivity; weight sharing keeps the new parameters small):

    logits_n[t, s] = τ_q,n(x_t, t) · ⟨q_n(x_t), k(x_s)⟩ · scale
    τ_q,n(x_t, t)  = 1 + tanh(u · q_n(x_t)) + max(σ_n, 0) · log(1 + t)  (token + position)
    v'(x_s)        = τ_v,k(x_s) · v_k(x_s),   τ_v,k(x_s) = 1 + tanh(w · v_k(x_s))

The token terms share the q / v projections (the paper's weight sharing: f(x) = uᵀ W_q x, so
the new parameters are u [H] and w [V], one of each per layer, plus σ [N] per query head; a
few hundred parameters, far below the paper's 0.5% bound). Position t is ``ctx.positions_BT``
(absolute, 0-based); the log(1 + t) term is the paper's counter to attention dilution in
long contexts. u = w = σ = 0 at birth, so a fresh SSA layer is exactly the "mha" layer with
the same q/k/v/o parameters (fine-tuning an existing model starts from it unchanged).
τ_q >= tanh's lower bound stays positive: 1 + tanh(·) > 0 and the position term is >= 0.

Not checked against the paper's equations: the form of τ above (a tanh token term on the
shared projection plus a log-position term) follows the paper's description (PAPERS.md §1,
its abstract and §3 headings); the paper's text and code were not readable here, so the exact
parameterisation (e.g. where σ enters, whether τ multiplies q or the logits after scaling)
may differ. The exact-reduction properties (τ = 1 == mha; entropy falls as τ rises) hold.

Stages: ``qk_transform`` computes τ_q from the raw query (before qk-norm and RoPE, which it
then applies) and scales q by it, which is exactly a per-query logit scale, so every
backend of the op (xla, chunked, the Pallas kernels) and the decode caches serve SSA
unchanged; τ_v scales v there too (it depends only on the value's own token, so the cache
stores scaled values). Everything else is the "mha" kind's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

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
      position_temperature: the position term max(σ_n, 0) · log(1 + t) (σ [N]).
      value_temperature: the value temperature 1 + tanh(w · v) (parameter w [V]).
    """

    kind: ClassVar[str] = "ssa"

    query_temperature: bool = True
    position_temperature: bool = True
    value_temperature: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("query_temperature", "position_temperature", "value_temperature"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"{type(self).__name__}.{name}={getattr(self, name)!r} must be a bool"
                )

    @property
    def num_extra_params(self) -> int:
        """SSA's parameters beyond the "mha" layer's: H + N + V (those switched on)."""
        c = self
        return (
            c.query_temperature * c.h + c.position_temperature * c.n_q + (c.value_temperature * c.v)
        )

    def build(self, *, rngs: nnx.Rngs) -> SelectiveAttention:
        """The :class:`SelectiveAttention` module of this config."""
        return SelectiveAttention(self, rngs=rngs)


register_kind("ssa", SSAConfig)


def ssa_temperatures(q_BTNH, v_BTKV, positions_BT, u_H=None, sigma_N=None, w_V=None):
    """SSA's query and value temperatures (module docstring), in fp32.

    Args:
      q_BTNH: raw queries (before qk-norm / RoPE); v_BTKV: values (None: no τ_v).
      positions_BT: absolute 0-based positions.
      u_H, sigma_N, w_V: the temperature parameters (None: that term off).

    Returns:
      (tau_BTN, tau_v_BTK): the per-query logit scale and the per-value scale (None when the
      value temperature is off).
    """
    b, t, n, _ = q_BTNH.shape
    tau_BTN = jnp.ones((b, t, n), jnp.float32)
    if u_H is not None:
        tau_BTN += jnp.tanh(jnp.einsum("btnh,h->btn", q_BTNH.astype(jnp.float32), u_H))
    if sigma_N is not None:
        log_pos_BT = jnp.log1p(positions_BT.astype(jnp.float32))
        # max(σ, 0): τ stays positive; at σ = 0 (birth) jax's max splits the gradient
        tau_BTN += jnp.maximum(sigma_N.astype(jnp.float32), 0.0) * log_pos_BT[..., None]
    tau_v_BTK = None
    if w_V is not None and v_BTKV is not None:
        tau_v_BTK = 1 + jnp.tanh(jnp.einsum("btkv,v->btk", v_BTKV.astype(jnp.float32), w_V))
    return tau_BTN, tau_v_BTK


class SelectiveAttention(Attention):
    """MHA / GQA with SSA's query, position and value temperatures (the ``"ssa"`` kind).

    Parameters: those of :class:`Attention` plus ``tau_u`` [H] (head_dim), ``tau_sigma`` [N]
    (heads) and ``tau_w`` [V] (head_dim), zero at birth.
    """

    def __init__(self, config: SSAConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config

        def zeros(n, axis):
            return param(rngs, (n,), (axis,), init=jax.nn.initializers.zeros, dtype=c.param_dtype)

        if c.query_temperature:
            self.tau_u = zeros(c.h, "head_dim")
        if c.position_temperature:
            self.tau_sigma = zeros(c.n_q, "heads")
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
            self.tau_sigma[...] if c.position_temperature else None,
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
