"""Agent Attention (Han et al. 2024), the ``"agent"`` attention kind: an ENCODER
(bidirectional) layer over a 1-D sequence.

Stages (``jaxattn.layers.AttentionLayer``): project q, k, v [D, N, H] (Linears); the op
``jaxattn.ops.agent_attention`` with ``num_agents`` agents pooled from the queries, the
layer's agent biases B1 [N, n, seq_len] and B2 [N, seq_len, n] (the authors initialise their
biases truncated-normal with std 0.02; here normal, std 0.02) and the depthwise convolution
of V (width ``dwc_width``; kernel normal with std 0.02, bias zero: torch's default conv init
is not reproduced); out o [N, H, D].

What the kind supports: full-sequence calls ``layer(x_BTD)`` with num_agents <= T <=
``seq_len`` (a shorter input uses the first T columns / rows of B1 / B2). The agents pool
over the whole sequence and the DWC looks ahead, so every output depends on later tokens: the
paper gives no causal or incremental form, and the layer refuses a causal decoder model
(``from_model``), ``decode`` / ``init_cache`` and packed sequences, with errors saying so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import _validate as v
from jaxattn.layers._base import param
from jaxattn.layers._context import Context
from jaxattn.layers._encoder_only import EncoderOnlyAttention
from jaxattn.layers._kinds import register_kind
from jaxattn.layers._linear import Linear
from jaxattn.ops.agent_attention import agent_attention

__all__ = ["AgentAttentionConfig", "AgentAttention"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AgentAttentionConfig:
    """Hyper-parameters of :class:`AgentAttention` (the ``"agent"`` kind; encoder only).

    Attributes:
      d_model: model width D; num_heads: N; head_dim: H (default d_model // num_heads).
      num_agents: n agent tokens (1 <= n <= seq_len).
      seq_len: the longest input (the biases' length).
      agent_bias: learn B1 and B2 (the paper's agent biases); False: none.
      dwc_width: odd width of the depthwise convolution of V; 0: no DWC.
      dtype: compute dtype (None: the input's); param_dtype: parameter dtype.
    """

    kind: ClassVar[str] = "agent"

    d_model: int
    num_heads: int
    num_agents: int
    seq_len: int
    head_dim: int | None = None
    agent_bias: bool = True
    dwc_width: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        v.check_int(o, "d_model", self.d_model)
        v.check_int(o, "num_heads", self.num_heads)
        v.check_int(o, "num_agents", self.num_agents)
        v.check_int(o, "seq_len", self.seq_len)
        v.check_optional_int(o, "head_dim", self.head_dim)
        v.check_int(o, "dwc_width", self.dwc_width, minimum=0)
        v.check_dtype(o, "dtype", self.dtype, optional=True)
        v.check_dtype(o, "param_dtype", self.param_dtype)
        if self.num_agents > self.seq_len:
            raise ValueError(f"{o}.num_agents={self.num_agents} exceeds seq_len={self.seq_len}")
        if self.dwc_width and self.dwc_width % 2 == 0:
            raise ValueError(f"{o}.dwc_width={self.dwc_width} must be odd (or 0: no DWC)")
        v.check_head_split(o, self.num_heads, self.d_model, self.head_dim)

    @classmethod
    def from_model(cls, m, layer: int):
        """Refused: a ``models.ModelConfig`` builds causal decoder layers, and agents pooled
        over the whole sequence see later tokens (the paper defines no causal form).

        Raises:
          ValueError: always.
        """
        raise ValueError(
            f"attention kind 'agent' (layer {layer}) cannot serve a causal decoder model: its "
            "agents are pooled over the whole sequence (and its DWC looks ahead), so every "
            "output sees later tokens, and Agent Attention defines no causal or incremental "
            "form. Use AgentAttentionConfig(...).build(rngs=...) as a bidirectional encoder layer"
        )

    def build(self, *, rngs: nnx.Rngs) -> AgentAttention:
        """The :class:`AgentAttention` module of this config."""
        return AgentAttention(self, rngs=rngs)

    @property
    def h(self) -> int:
        """H, the head dim."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim


register_kind("agent", AgentAttentionConfig)


class AgentAttention(EncoderOnlyAttention):
    """Bidirectional agent attention (module docstring).

    Parameter paths: ``q/kernel``, ``k/kernel``, ``v/kernel``, ``o/kernel``; with
    ``agent_bias``: ``agent_bias`` [N, n, seq_len] (B1) and ``query_bias`` [N, seq_len, n]
    (B2); with a DWC: ``dwc_kernel`` [W, N, H] and ``dwc_bias`` [N, H].

    Args:
      config: an :class:`AgentAttentionConfig`.
      rngs: parameter RNGs.
    """

    no_decoding_reason = (
        "its agents pool the whole sequence (each output depends on later tokens), and "
        "Agent Attention defines no incremental form"
    )
    segments_reason = "its agents pool across segments"

    def __init__(self, config: AgentAttentionConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, n, h, a, s = c.d_model, c.num_heads, c.h, c.num_agents, c.seq_len
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        axes = ("embed", "heads", "head_dim")
        self.q, self.k, self.v = (Linear((d,), (n, h), axes=axes, **common) for _ in range(3))
        self.o = Linear((n, h), (d,), axes=("heads", "head_dim", "embed"), **common)
        init = nnx.initializers.normal(stddev=0.02)
        pd = c.param_dtype
        if c.agent_bias:
            self.agent_bias = param(rngs, (n, a, s), ("heads", None, None), init=init, dtype=pd)
            self.query_bias = param(rngs, (n, s, a), ("heads", None, None), init=init, dtype=pd)
        if c.dwc_width:
            w = c.dwc_width
            self.dwc_kernel = param(
                rngs, (w, n, h), (None, "heads", "head_dim"), init=init, dtype=pd
            )
            self.dwc_bias = param(
                rngs, (n, h), ("heads", "head_dim"), init=nnx.initializers.zeros, dtype=pd
            )

    def _check_input(self, x_BTD) -> jax.Array:
        x_BTD = super()._check_input(x_BTD)
        c, t = self.config, x_BTD.shape[1]
        if not c.num_agents <= t <= c.seq_len:
            raise ValueError(
                f"AgentAttention input length {t} must be in [num_agents={c.num_agents}, "
                f"seq_len={c.seq_len}]"
            )
        return x_BTD

    def project(self, x_BTD: jax.Array, ctx: Context):
        """q_BTNH and (k_BTNH, v_BTNH)."""
        return self.q(x_BTD, ctx), (self.k(x_BTD, ctx), self.v(x_BTD, ctx))

    def attend(self, q_BTNH, kv, ctx: Context) -> jax.Array:
        """Agent aggregation then broadcast, plus DWC(V) -> o_BTNH (bidirectional)."""
        self.refuse_segments(ctx)
        c, t = self.config, q_BTNH.shape[1]
        k_BTNH, v_BTNH = kv
        extra = {}
        if c.agent_bias:
            extra["agent_bias"] = self.agent_bias[:, :, :t]
            extra["query_bias"] = self.query_bias[:, :t]
        if c.dwc_width:
            extra["dwc_kernel"], extra["dwc_bias"] = self.dwc_kernel[...], self.dwc_bias[...]
        return agent_attention(q_BTNH, k_BTNH, v_BTNH, num_agents=c.num_agents, **extra)
