"""Efficient Probing (EP): a multi-query cross-attention classifier head over frozen tokens.

Psomas et al. 2025, "Attention, Please! Revisiting Attentive Probing for Masked Image
Modeling" (the pooling is ``jaxattn.ops.efficient_probing``). The probe owns M learned
queries [M, D], one value projection W_v [D, E] (E = D / d_out) and a linear classifier
[E, C]; the keys are the frozen tokens themselves, so the query, key and output projections
of a conventional attentive (MHA) probe are gone. Trainable parameters:

    EP:        M·D + D·E (+ E with v_bias) + E·C + C
    MHA probe: D + 4·(D² + D) + D·C + C     (one learned query; W_q, W_k, W_v, W_o with biases)

(:func:`ep_probe_num_params`, :func:`mha_probe_num_params`). The tokens are frozen: the
probe applies ``jax.lax.stop_gradient`` to them (``stop_gradient=True``, the default), so a
loss on the logits sends no gradient into the backbone that produced them even when the
backbone runs in the same differentiated function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import _validate as v
from jaxattn.layers._base import param
from jaxattn.layers._linear import Linear
from jaxattn.ops.efficient_probing import efficient_probing_pool

__all__ = [
    "EfficientProbeConfig",
    "EfficientProbe",
    "ep_probe_num_params",
    "mha_probe_num_params",
]


def ep_probe_num_params(
    d_model: int, num_classes: int, num_queries: int, d_out: int = 1, v_bias: bool = False
) -> int:
    """EP's trainable parameters: M·D + D·E (+ E) + E·C + C, E = D / d_out."""
    e = d_model // d_out
    return (
        num_queries * d_model + d_model * e + (e if v_bias else 0) + e * num_classes + num_classes
    )


def mha_probe_num_params(d_model: int, num_classes: int) -> int:
    """A conventional MHA attentive probe (one learned query, W_q/W_k/W_v/W_o [D, D] with
    biases, linear classifier): D + 4·(D² + D) + D·C + C."""
    d = d_model
    return d + 4 * (d * d + d) + d * num_classes + num_classes


@dataclasses.dataclass(frozen=True, kw_only=True)
class EfficientProbeConfig:
    """Hyper-parameters of :class:`EfficientProbe`.

    Attributes:
      d_model: D, the frozen tokens' width.
      num_classes: C, the classifier's outputs.
      num_queries: M learned queries (the authors' default 32); divides D / d_out.
      d_out: the value width is E = D / d_out (d_out divides D; 1 keeps the width).
      v_bias: a bias on W_v (the authors' ``qkv_bias``, default off).
      stop_gradient: cut the gradient into the tokens (they are frozen features).
      dtype: compute dtype (None: the input's); param_dtype: parameter dtype.
    """

    d_model: int
    num_classes: int
    num_queries: int = 32
    d_out: int = 1
    v_bias: bool = False
    stop_gradient: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        v.check_int(o, "d_model", self.d_model)
        v.check_int(o, "num_classes", self.num_classes)
        v.check_int(o, "num_queries", self.num_queries)
        v.check_int(o, "d_out", self.d_out)
        v.check_dtype(o, "dtype", self.dtype, optional=True)
        v.check_dtype(o, "param_dtype", self.param_dtype)
        if self.d_model % self.d_out:
            raise ValueError(f"{o}.d_out={self.d_out} must divide d_model={self.d_model}")
        if self.value_dim % self.num_queries:
            raise ValueError(
                f"{o}.num_queries={self.num_queries} must divide the value width "
                f"d_model / d_out = {self.value_dim}"
            )

    @property
    def value_dim(self) -> int:
        """E = D / d_out."""
        return self.d_model // self.d_out

    @property
    def num_params(self) -> int:
        """:func:`ep_probe_num_params` of this config."""
        return ep_probe_num_params(
            self.d_model, self.num_classes, self.num_queries, self.d_out, self.v_bias
        )

    def build(self, *, rngs: nnx.Rngs) -> EfficientProbe:
        return EfficientProbe(self, rngs=rngs)


class EfficientProbe(nnx.Module):
    """EP head: tokens [B, S, D] -> class logits [B, C]. Paths: ``queries``, ``v/kernel``
    (+ ``v/bias``), ``head/kernel`` + ``head/bias``.

    Args:
      config: an :class:`EfficientProbeConfig`.
      rngs: parameter RNGs.
    """

    def __init__(self, config: EfficientProbeConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        d, e = c.d_model, c.value_dim
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        init = nnx.initializers.normal(stddev=0.02)  # the authors' query init
        self.queries = param(
            rngs, (c.num_queries, d), (None, "embed"), init=init, dtype=c.param_dtype
        )
        self.v = Linear((d,), (e,), axes=("embed", "mlp"), use_bias=c.v_bias, **common)
        self.head = Linear((e,), (c.num_classes,), axes=("mlp", "vocab"), use_bias=True, **common)

    def pool(self, x_BSD: jax.Array, mask_BS=None) -> jax.Array:
        """The EP-pooled features [B, E] (before the classifier)."""
        c = self.config
        x_BSD = jnp.asarray(x_BSD)
        if x_BSD.ndim != 3 or x_BSD.shape[-1] != c.d_model:
            raise ValueError(f"x_BSD must be [B, S, d_model={c.d_model}], got {x_BSD.shape}")
        if c.stop_gradient:  # frozen features: nothing flows back into their producer
            x_BSD = jax.lax.stop_gradient(x_BSD)
        if c.dtype is not None:
            x_BSD = x_BSD.astype(c.dtype)
        queries = self.queries[...].astype(x_BSD.dtype)
        return efficient_probing_pool(queries, x_BSD, self.v(x_BSD), mask_BS=mask_BS)

    def __call__(self, x_BSD: jax.Array, mask_BS=None) -> jax.Array:
        """Class logits [B, C] of tokens x_BSD (``mask_BS``: optional bool [B, S], True for a
        real token)."""
        return self.head(self.pool(x_BSD, mask_BS))
