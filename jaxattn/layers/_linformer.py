"""Linformer self-attention (Wang et al. 2020), the ``"linformer"`` attention kind: an ENCODER
(bidirectional) layer.

Stages (``jaxattn.layers.AttentionLayer``): project q [D, N, H], k [D, K, H], v [D, K, H]
(Linears); the op ``jaxattn.ops.linformer_attention`` with the layer's sequence projections
E, F [k, n] (``proj_len`` k, ``seq_len`` n); out o [N, H, D].

What the kind supports: full-sequence calls ``layer(x_BTD)`` with T <= ``seq_len`` (a shorter
input uses E[:, :T], i.e. zero-padding to n), every query attending to the k projected keys
(O(T·k) scores). E and F mix positions along the sequence, so a query's output depends on
later tokens: the paper defines no causal form and no incremental decoding. The layer
therefore refuses

* a causal decoder model (``from_model``: ``models.ModelConfig`` layers are causal),
* ``decode`` / ``init_cache`` (no cache is defined),
* packed sequences (``segment_ids``: E would mix segments),

each with a ValueError / NotImplementedError saying so, rather than inventing semantics.

Sharing (the paper's §4 "additional efficiency techniques"): ``"none"``: E_i, F_i per kv head
[K, k, n]; ``"headwise"``: one E and one F [k, n] for all heads; ``"kv"``: one E [k, n] used
as both E and F. E and F are initialised normal with std 1/sqrt(k) (as lucidrains/linformer).
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
from jaxattn.ops.linformer import linformer_attention

__all__ = ["LinformerConfig", "LinformerAttention", "LINFORMER_SHARING"]

LINFORMER_SHARING = ("none", "headwise", "kv")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinformerConfig:
    """Hyper-parameters of :class:`LinformerAttention` (the ``"linformer"`` kind; encoder only).

    Attributes:
      d_model: model width D.
      num_heads: N query heads; num_kv_heads: K (default N), dividing N.
      head_dim: H (default d_model // num_heads).
      seq_len: n, the longest input (E and F have n columns).
      proj_len: k, the projected length (1 <= k; k < n for savings, k = n allowed).
      sharing: one of ``LINFORMER_SHARING`` (module docstring).
      implementation: ``dot_product_attention``'s backend over the k projected keys.
      dtype: compute dtype (None: the input's); param_dtype: parameter dtype.
    """

    kind: ClassVar[str] = "linformer"

    d_model: int
    num_heads: int
    seq_len: int
    proj_len: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    sharing: str = "none"
    implementation: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        v.check_int(o, "d_model", self.d_model)
        v.check_int(o, "num_heads", self.num_heads)
        v.check_int(o, "seq_len", self.seq_len)
        v.check_int(o, "proj_len", self.proj_len)
        v.check_optional_int(o, "num_kv_heads", self.num_kv_heads)
        v.check_optional_int(o, "head_dim", self.head_dim)
        v.check_implementation(o, "implementation", self.implementation)
        v.check_dtype(o, "dtype", self.dtype, optional=True)
        v.check_dtype(o, "param_dtype", self.param_dtype)
        if self.sharing not in LINFORMER_SHARING:
            raise ValueError(f"{o}.sharing={self.sharing!r} must be one of {LINFORMER_SHARING}")
        v.check_head_split(o, self.num_heads, self.d_model, self.head_dim)
        if self.num_heads % self.n_kv:
            raise ValueError(f"{o}.num_kv_heads={self.n_kv} must divide num_heads={self.num_heads}")

    @classmethod
    def from_model(cls, m, layer: int):
        """Refused: a ``models.ModelConfig`` builds causal decoder layers, and Linformer's
        sequence projections mix positions (the paper defines no causal form).

        Raises:
          ValueError: always.
        """
        raise ValueError(
            f"attention kind 'linformer' (layer {layer}) cannot serve a causal decoder model: "
            "its projections E, F mix positions along the sequence, so every output sees later "
            "tokens, and Linformer defines no causal or incremental form. Use "
            "LinformerConfig(...).build(rngs=...) as a bidirectional encoder layer"
        )

    def build(self, *, rngs: nnx.Rngs) -> LinformerAttention:
        """The :class:`LinformerAttention` module of this config."""
        return LinformerAttention(self, rngs=rngs)

    @property
    def n_kv(self) -> int:
        """K, the kv heads."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def h(self) -> int:
        """H, the head dim."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim


register_kind("linformer", LinformerConfig)


class LinformerAttention(EncoderOnlyAttention):
    """Bidirectional Linformer self-attention (module docstring).

    Parameter paths: ``q/kernel``, ``k/kernel``, ``v/kernel``, ``o/kernel``, ``e`` and (unless
    ``sharing="kv"``) ``f``: [K, k, n] (``"none"``) or [k, n].

    Args:
      config: a :class:`LinformerConfig`.
      rngs: parameter RNGs.
    """

    no_decoding_reason = (
        "its sequence projections mix positions (each output depends on later tokens), and "
        "Linformer defines no incremental form"
    )
    segments_reason = "its projections mix positions across segments"

    def __init__(self, config: LinformerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, n, k, h = c.d_model, c.num_heads, c.n_kv, c.h
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.q = Linear((d,), (n, h), axes=("embed", "heads", "head_dim"), **common)
        self.k = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), **common)
        self.v = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), **common)
        self.o = Linear((n, h), (d,), axes=("heads", "head_dim", "embed"), **common)
        shape, axes = (c.proj_len, c.seq_len), (None, None)
        if c.sharing == "none":
            shape, axes = (k, *shape), ("kv_heads", None, None)
        init = nnx.initializers.normal(stddev=c.proj_len**-0.5)
        self.e = param(rngs, shape, axes, init=init, dtype=c.param_dtype)
        if c.sharing != "kv":
            self.f = param(rngs, shape, axes, init=init, dtype=c.param_dtype)

    def _check_input(self, x_BTD) -> jax.Array:
        x_BTD = super()._check_input(x_BTD)
        if x_BTD.shape[1] > self.config.seq_len:
            raise ValueError(
                f"LinformerAttention input length {x_BTD.shape[1]} exceeds "
                f"LinformerConfig.seq_len={self.config.seq_len}"
            )
        return x_BTD

    def project(self, x_BTD: jax.Array, ctx: Context):
        """q_BTNH and (k_BTKH, v_BTKH)."""
        return self.q(x_BTD, ctx), (self.k(x_BTD, ctx), self.v(x_BTD, ctx))

    def attend(self, q_BTNH, kv, ctx: Context) -> jax.Array:
        """Every query over the k projected keys/values -> o_BTNH (bidirectional)."""
        self.refuse_segments(ctx)
        k_BTKH, v_BTKH = kv
        f = self.e if self.config.sharing == "kv" else self.f
        return linformer_attention(
            q_BTNH,
            k_BTKH,
            v_BTKH,
            self.e[...].astype(q_BTNH.dtype),
            f[...].astype(q_BTNH.dtype),
            implementation=self.config.implementation,
        )
