"""Titans' neural long-term memory as a sequence-mixing layer (memory as a layer, MAL).

Behrouz et al. 2024, "Titans: Learning to Memorize at Test Time", §3 and §4.3. The op is
``jaxattn.ops.titans.titans_memory`` (Eq. 13-15, chunked-parallel with chunk-start gradients);
this module supplies its inputs as the paper does:

* project: q, k, v [D, N, H] Linears; q and k are SiLU'd and unit-normed (§4.4); the gates are
  per token and head, θ_t = lr_max · σ(x W_θ + b_θ), η_t = σ(x W_η + b_η), α_t = σ(x W_α + b_α);
* the memory's initial weights M_0 are parameters (one MLP per head, ``memory_depth``
  matrices, hidden width ``memory_expansion`` · H), learned by the outer loop;
* the op, then o [N, H, D].

Decoding carries the state (M_t, S_t) explicitly: :meth:`TitansMemory.init_state` and
:meth:`TitansMemory.step` (the C = 1 recurrence, so a step costs the same at any context).
It is not a registered attention kind: a kind's cache lives in ``jaxattn.cache``, which has no
format for a pytree of per-row MLP weights yet.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import _validate as v
from jaxattn.layers._context import Context
from jaxattn.layers._linear import Linear
from jaxattn.ops.titans import MEMORY_ACTIVATIONS, titans_memory

__all__ = ["TitansMemoryConfig", "TitansMemory"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TitansMemoryConfig:
    """Hyper-parameters of :class:`TitansMemory`.

    Attributes:
      d_model: model width D; num_heads: N memories; head_dim: H (default D // N).
      memory_depth: matrices in each memory MLP (>= 1; 1 is the linear memory).
      memory_expansion: hidden width of a deep memory, in units of H (>= 1).
      activation: between the memory's matrices, a name in ``MEMORY_ACTIVATIONS``.
      lr_max: the largest inner learning rate θ (> 0).
      chunk_size: tokens whose gradients share their chunk-start weights (>= 1; must divide
        the sequence length; 1 is the exact recurrence).
      dtype: compute dtype of the projections (None: the input's); param_dtype: parameters'.
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    memory_depth: int = 2
    memory_expansion: int = 2
    activation: str = "silu"
    lr_max: float = 0.1
    chunk_size: int = 16
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        v.check_int(o, "d_model", self.d_model)
        v.check_int(o, "num_heads", self.num_heads)
        v.check_optional_int(o, "head_dim", self.head_dim)
        v.check_int(o, "memory_depth", self.memory_depth)
        v.check_int(o, "memory_expansion", self.memory_expansion)
        v.check_int(o, "chunk_size", self.chunk_size)
        v.check_float(o, "lr_max", self.lr_max)
        v.check_dtype(o, "dtype", self.dtype, optional=True)
        v.check_dtype(o, "param_dtype", self.param_dtype)
        if self.activation not in MEMORY_ACTIVATIONS:
            raise ValueError(
                f"{o}.activation={self.activation!r} must be one of {sorted(MEMORY_ACTIVATIONS)}"
            )
        v.check_head_split(o, self.num_heads, self.d_model, self.head_dim)

    @property
    def h(self) -> int:
        """H, the head dim of q, k and v."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    def memory_widths(self) -> tuple[int, ...]:
        """(H, hidden, …, hidden, H): the memory MLP's layer widths."""
        hidden = self.memory_expansion * self.h
        return (self.h,) + (hidden,) * (self.memory_depth - 1) + (self.h,)

    def build(self, *, rngs: nnx.Rngs) -> TitansMemory:
        """The :class:`TitansMemory` module of this config."""
        return TitansMemory(self, rngs=rngs)


class TitansMemory(nnx.Module):
    """Titans memory as a layer: [B, T, D] -> [B, T, D] (see the module docstring).

    Parameter paths: ``q|k|v|o/kernel``, ``lr|momentum|decay/kernel`` + ``/bias`` (gates),
    ``memory_0 … memory_{depth-1}`` (M_0, [N, H_l, H_{l+1}]).
    """

    def __init__(self, config: TitansMemoryConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, n, h = c.d_model, c.num_heads, c.h
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.q = Linear((d,), (n, h), axes=("embed", "heads", "head_dim"), **common)
        self.k = Linear((d,), (n, h), axes=("embed", "heads", "head_dim"), **common)
        self.v = Linear((d,), (n, h), axes=("embed", "heads", "head_dim"), **common)
        self.o = Linear((n, h), (d,), axes=("heads", "head_dim", "embed"), **common)
        for name in ("lr", "momentum", "decay"):
            setattr(
                self, name, Linear((d,), (n,), axes=("embed", "heads"), use_bias=True, **common)
            )
        widths = c.memory_widths()
        self.num_memory = len(widths) - 1
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            w = jax.random.normal(rngs.params(), (n, a, b), c.param_dtype) / jnp.sqrt(a)
            setattr(self, f"memory_{i}", nnx.Param(w))

    def memory_weights(self, batch: int):
        """M_0 broadcast over the batch: a tuple of [B, N, H_l, H_{l+1}] float32."""
        ws = (getattr(self, f"memory_{i}")[...] for i in range(self.num_memory))
        return tuple(jnp.broadcast_to(w.astype(jnp.float32), (batch,) + w.shape) for w in ws)

    def init_state(self, batch: int):
        """(M_0, S_0 = 0) for ``batch`` rows, the state :meth:`step` carries."""
        w = self.memory_weights(batch)
        return w, tuple(jnp.zeros_like(a) for a in w)

    def _inputs(self, x_BTD, ctx):
        unit = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)  # noqa: E731
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        q = unit(jax.nn.silu(f32(self.q(x_BTD, ctx))))
        k = unit(jax.nn.silu(f32(self.k(x_BTD, ctx))))
        v = f32(self.v(x_BTD, ctx))
        lr = self.config.lr_max * jax.nn.sigmoid(f32(self.lr(x_BTD, ctx)))
        mom = jax.nn.sigmoid(f32(self.momentum(x_BTD, ctx)))
        dec = jax.nn.sigmoid(f32(self.decay(x_BTD, ctx)))
        return q, k, v, lr, mom, dec

    def _run(self, x_BTD, ctx, state, chunk_size):
        ctx = Context.create(x_BTD.shape[0], x_BTD.shape[1]) if ctx is None else ctx
        if ctx.segment_ids_BT is not None:
            raise NotImplementedError(
                "TitansMemory cannot serve segment_ids (packed sequences): its memory would "
                "carry across segments"
            )
        weights, momentum = self.init_state(x_BTD.shape[0]) if state is None else state
        y, weights, momentum = titans_memory(
            *self._inputs(x_BTD, ctx),
            weights,
            momentum,
            chunk_size=chunk_size,
            activation=self.config.activation,
        )
        out = self.out(
            y.astype(x_BTD.dtype if self.config.dtype is None else self.config.dtype), ctx
        )
        return out, (weights, momentum)

    def out(self, o_BTNH, ctx):
        """o projection [B, T, N, H] -> [B, T, D]."""
        return self.o(o_BTNH, ctx)

    def __call__(self, x_BTD: jax.Array, ctx: Context | None = None) -> jax.Array:
        """The chunked-parallel form from M_0: x [B, T, D] (T % chunk_size == 0) -> [B, T, D]."""
        return self._run(x_BTD, ctx, None, self.config.chunk_size)[0]

    def step(self, x_BTD: jax.Array, state, ctx: Context | None = None):
        """The exact recurrence (chunk size 1) over x [B, T, D] from ``state`` (M, S), for
        prefill and decoding: -> (y [B, T, D], the state after the last token)."""
        return self._run(x_BTD, ctx, state, 1)
