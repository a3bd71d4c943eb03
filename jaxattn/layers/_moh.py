"""Mixture-of-Head attention (MoH, Jin et al. 2024, arXiv 2410.11842): the ``"moh"`` kind.

Heads are experts. Of the N query heads the first S (``num_shared_heads``) are always on and
the other E = N - S are routed: per token x_t a router picks the top-k routed heads, and the
output is the gated sum over heads (paper eq. 4-6; gate scalings of the reference code,
SkyworkAI/MoH ``MoH-DiT/models.py``, so uniform gates equal 1)

    out_t = Σ_n g_n(x_t) · W_O^n · o_n(x_t)
    routed n:  g_n = α_2 · k · softmax_{top-k}(W_r x_t)_n   (0 outside the token's top-k)
    shared n:  g_n = α_1 · S · softmax(W_s x_t)_n
    [α_1, α_2] = 2 · softmax(W_h x_t)                       (only when S > 0 and E > 0)

(``softmax_{top-k}`` is the softmax over the k selected logits: the reference's masked
softmax renormalised over the selection.) Load balance (the reference's ``l_aux``):
L_b = E² · mean_e(P_e · f_e), P_e the mean router probability of routed head e over the
batch's tokens and f_e the fraction of tokens that select it (= k at perfect balance); sown
per forward through :func:`jaxattn.layers._aux.sow_aux_loss` (the train step adds it with
``TrainConfig.aux_loss_weight`` and reports ``aux_loss``).

Cost: this is the dense masked form. Every head's attention is computed and the gates are
applied in the ``head_gate`` stage before the output projection, so it costs as much as MHA
(plus the router); the paper's saving from skipping inactive heads is not realised here.
Everything else (GQA, RoPE, caches, windows) is the ``"mha"`` kind's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import _validate as v
from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._aux import sow_aux_loss
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import register_kind
from jaxattn.layers._linear import Linear

__all__ = ["MoHConfig", "MoHAttention", "moh_gates"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoHConfig(AttentionConfig):
    """:class:`AttentionConfig` plus MoH routing (the ``"moh"`` kind).

    Attributes:
      num_shared_heads: S, always-on heads (the first S query heads); default N // 2 (the
        reference's MoH-LLaMA3 setting). 0 <= S < N.
      top_k: k routed heads active per token, in [1, N - S]; default (N - S + 1) // 2.
    """

    kind: ClassVar[str] = "moh"

    num_shared_heads: int | None = None
    top_k: int | None = None

    def __post_init__(self):
        super().__post_init__()
        o = type(self).__name__
        v.check_optional_int(o, "num_shared_heads", self.num_shared_heads, minimum=0)
        v.check_optional_int(o, "top_k", self.top_k)
        n, s = self.n_q, self.n_shared
        if not 0 <= s < n:
            raise ValueError(
                f"{o}: num_shared_heads={s} must be in [0, query heads={n}) (at least one routed)"
            )
        if not 1 <= self.k <= n - s:
            raise ValueError(
                f"{o}: top_k={self.k} must be in [1, routed heads={n - s}] "
                f"(query heads {n} - num_shared_heads {s})"
            )

    @property
    def n_shared(self) -> int:
        """S, the always-on heads."""
        return self.n_q // 2 if self.num_shared_heads is None else self.num_shared_heads

    @property
    def n_routed(self) -> int:
        """E = N - S, the routed heads."""
        return self.n_q - self.n_shared

    @property
    def k(self) -> int:
        """Routed heads active per token."""
        return (self.n_routed + 1) // 2 if self.top_k is None else self.top_k

    @property
    def active_head_fraction(self) -> float:
        """(S + k) / N: the heads a token uses (the paper's "x% of heads")."""
        return (self.n_shared + self.k) / self.n_q

    def build(self, *, rngs: nnx.Rngs) -> MoHAttention:
        """The :class:`MoHAttention` module of this config."""
        return MoHAttention(self, rngs=rngs)


register_kind("moh", MoHConfig)


def moh_gates(logits_BTE, shared_logits_BTS, mix_logits_BT2, top_k: int):
    """MoH head gates (module docstring) from router logits, in fp32.

    Args:
      logits_BTE: routed-head logits W_r x [B, T, E].
      shared_logits_BTS: shared-head logits W_s x [B, T, S] (S may be 0).
      mix_logits_BT2: W_h x [B, T, 2], or None when S == 0.
      top_k: k.

    Returns:
      (g_BTN [B, T, S + E] shared heads first, mask_BTE 0/1 top-k selection, lb: L_b scalar).
    """
    e = logits_BTE.shape[-1]
    p_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    _, idx_BTk = jax.lax.top_k(p_BTE, top_k)
    mask_BTE = jax.nn.one_hot(idx_BTk, e, dtype=jnp.float32).sum(axis=-2)
    sel_BTE = p_BTE * mask_BTE
    # renormalise over the selection (eps as the reference: a fully underflowed row stays 0)
    denom_BT1 = jnp.maximum(sel_BTE.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps)
    routed_BTE = sel_BTE / denom_BT1 * top_k
    lb = e * e * jnp.mean(p_BTE.reshape(-1, e).mean(0) * mask_BTE.reshape(-1, e).mean(0))
    s = shared_logits_BTS.shape[-1]
    if s == 0:
        return routed_BTE, mask_BTE, lb
    shared_BTS = jax.nn.softmax(shared_logits_BTS.astype(jnp.float32), axis=-1) * s
    alpha_BT2 = jax.nn.softmax(mix_logits_BT2.astype(jnp.float32), axis=-1) * 2
    g_BTN = jnp.concatenate(
        [alpha_BT2[..., :1] * shared_BTS, alpha_BT2[..., 1:] * routed_BTE], axis=-1
    )
    return g_BTN, mask_BTE, lb


class MoHAttention(Attention):
    """MHA / GQA with MoH head gates (the ``"moh"`` kind; see the module docstring).

    Parameters: those of :class:`Attention` plus ``router`` [D, E], ``shared_router`` [D, S]
    (S > 1) and ``mix_router`` [D, 2] (S > 0), all bias-free like the reference.
    """

    def __init__(self, config: MoHConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config
        common = dict(axes=("embed", None), dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.router = Linear((c.d_model,), (c.n_routed,), **common)
        if c.n_shared > 1:
            self.shared_router = Linear((c.d_model,), (c.n_shared,), **common)
        if c.n_shared > 0:
            self.mix_router = Linear((c.d_model,), (2,), **common)

    def gates(self, x_BTD: jax.Array, ctx: Context):
        """(g_BTN, mask_BTE, L_b) of the tokens ``x_BTD`` (:func:`moh_gates`)."""
        c = self.config
        logits_BTE = self.router(x_BTD, ctx)
        b, t, _ = x_BTD.shape
        if c.n_shared > 1:
            shared_BTS = self.shared_router(x_BTD, ctx)
        else:  # one shared head: softmax over one logit is 1, no parameters needed
            shared_BTS = jnp.zeros((b, t, c.n_shared), jnp.float32)
        mix_BT2 = self.mix_router(x_BTD, ctx) if c.n_shared > 0 else None
        return moh_gates(logits_BTE, shared_BTS, mix_BT2, c.k)

    def head_gate(self, o_BTNV: jax.Array, ctx: Context, x_BTD: jax.Array | None = None):
        """o_n · g_n(x) per head; sows L_b (not in cache steps: ``ctx.decoding``)."""
        g_BTN, _, lb = self.gates(x_BTD, ctx)
        if not ctx.decoding:
            sow_aux_loss(self, lb)
        return o_BTNV * g_BTN[..., None].astype(o_BTNV.dtype)
