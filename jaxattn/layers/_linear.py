"""``Linear``: every weight matrix that multiplies activations (Extension point 1).

Attention q/k/v/o, the MLA down- and up-projections, the MLP and the LM head are all a
``Linear``: it owns its kernel [*in, *out] (+ bias [*out]), their logical axes, and how many
leading kernel axes are inputs (recorded on the kernel's metadata as ``fan_in_axes``, so an
optimizer rule can read fan-in from the parameter tree alone). Code that needs the weight as a
matrix (MLA absorption, export, SVD, low-rank optimizers) calls :meth:`Linear.effective_kernel`
or :meth:`Linear.as_matrix`, never the raw parameter.

Adapters: ``Linear.adapter`` is a slot (None by default) for an object with
``delta(x, ctx, *, base) -> [..., *out]`` (added to the output) and
``delta_kernel(base) -> [*in, *out]`` (the same change as a weight, for merging and
``effective_kernel``); its parameters are :class:`AdapterParam` so
``nnx.state(model, AdapterParam)`` selects them. ``jaxattn.lowrank.attach`` fills the slot
by parameter path; no layer code changes for an adapter.

Factorised kernels: ``Linear.form`` is a second slot (None by default) for a
:class:`jaxattn.layers.KernelForm` (``lowrank`` B·A, ``sltrain`` B·A + sparse S, ``sst``
U·diag(s)·Vᵀ; see ``jaxattn.layers._factorized``). When it is set the dense ``kernel`` is None,
the forward pass runs through the factors (``form.project``) and ``base_kernel`` /
``effective_kernel`` / ``as_matrix`` return the product, so every reader of the weight sees
the same matrix. ``jaxattn.layers.factorize`` (one layer) and ``jaxattn.optim.parameterize``
(by path) fill it.

A tied LM head is a ``Linear`` over the embedding table's own parameter, stored [V, D] and read
transposed (``transposed=True``): the model has one parameter at ``embed/table``. An adapter on
a tied head changes the unembedding only, not the embedding lookup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._base import DTypeLike, cast, default_init, dense, param, zeros_init

__all__ = ["Linear", "AdapterParam", "Adapter"]


class AdapterParam(nnx.Param):
    """A parameter of an adapter attached to a ``Linear`` (trainable like any ``nnx.Param``)."""


class Adapter(Protocol):
    """What ``Linear.adapter`` holds: a change to the projection ``x @ W``.

    ``delta(x, ctx, base=W)`` must equal ``x @ delta_kernel(W)`` for every x (up to rounding)
    when the adapter is mergeable; ``x`` is [..., *in] in the compute dtype and ``base`` is the
    kernel [*in, *out] in that dtype. ``delta`` may return None for "no change at all" (every
    adapter merged, disabled or inactive): the projection is then the base's own program. An
    adapter that also trains the bias (PEFT's ``bias="lora_only"``) has ``delta_bias()``
    ([*out]; included in ``delta``), which ``Linear.effective_bias`` folds in.
    """

    def delta(self, x: jax.Array, ctx: Any, *, base: jax.Array) -> jax.Array | None: ...

    def delta_kernel(self, base: jax.Array) -> jax.Array: ...


class Linear(nnx.Module):
    """``y = x · W (+ b) (+ adapter)``, contracting the trailing ``len(in_shape)`` axes of x.

    Args:
      in_shape: the contracted input dims (e.g. ``(D,)``, or ``(N, V)`` for an output proj).
      out_shape: the output dims (e.g. ``(N, H)``).
      axes: logical axis names of the kernel [*in, *out].
      use_bias: add a bias [*out] (axes: the out part of ``axes``).
      init: kernel initializer.
      dtype: compute dtype (None: the input's).
      param_dtype: parameter dtype.
      rngs: parameter RNGs.
      kernel: an existing parameter to use instead of a new one (tied weights).
      transposed: ``kernel`` is stored [*out, *in] (a tied LM head over the [V, D] table).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        axes: Sequence[str | None],
        use_bias: bool = False,
        init=default_init,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs | None = None,
        kernel: nnx.Param | None = None,
        transposed: bool = False,
    ):
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        if not self.in_shape or not self.out_shape or min(self.in_shape + self.out_shape) <= 0:
            raise ValueError(f"Linear needs positive in_shape {in_shape} and out_shape {out_shape}")
        axes = tuple(axes)
        n_in = len(self.in_shape)
        if len(axes) != n_in + len(self.out_shape):
            raise ValueError(f"{axes=} must name every dim of {self.in_shape} + {self.out_shape}")
        self.dtype = dtype
        self.transposed = bool(transposed)
        if kernel is None:
            if rngs is None:
                raise ValueError("Linear needs rngs to create its kernel")
            kernel = param(rngs, self.in_shape + self.out_shape, axes, init=init, dtype=param_dtype)
            kernel.set_metadata("fan_in_axes", n_in)
        else:
            stored = (
                self.out_shape + self.in_shape if transposed else self.in_shape + self.out_shape
            )
            if tuple(kernel.shape) != stored:
                raise ValueError(f"shared kernel has shape {kernel.shape}, expected {stored}")
        self.kernel = kernel
        self.bias = (
            param(rngs, self.out_shape, axes[n_in:], init=zeros_init, dtype=param_dtype)
            if use_bias
            else None
        )
        self.adapter = nnx.data(None)  # the adapter slot (a data attribute: it holds params)
        self.form = nnx.data(None)  # a factorised kernel replacing ``kernel`` (KernelForm)

    @property
    def fan_in(self) -> int:
        """Product of the input dims."""
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        """Product of the output dims."""
        return math.prod(self.out_shape)

    def base_kernel(self, dtype: DTypeLike | None = None) -> jax.Array:
        """The kernel without any adapter, as [*in, *out] (in ``dtype`` when given); for a
        factorised kernel (``form``), the product of its factors."""
        if self.form is not None:
            return self.form.matrix(dtype).reshape(self.in_shape + self.out_shape)
        w = self.kernel[...]
        if self.transposed:
            n_out = len(self.out_shape)
            w = jnp.transpose(w, tuple(range(n_out, w.ndim)) + tuple(range(n_out)))
        return cast(w, dtype)

    def effective_kernel(self, dtype: DTypeLike | None = None) -> jax.Array:
        """The kernel [*in, *out] with the adapter (if any) folded in."""
        w = self.base_kernel(dtype)
        if self.adapter is not None:
            w = w + self.adapter.delta_kernel(w).astype(w.dtype)
        return w

    def effective_bias(self) -> jax.Array | None:
        """The bias [*out] with the adapter's bias change (if any) folded in (None: no bias)."""
        if self.bias is None:
            return None
        b = self.bias[...]
        change = getattr(self.adapter, "delta_bias", None)
        d = change() if change is not None else None
        return b if d is None else b + d.astype(b.dtype)

    def as_matrix(self, dtype: DTypeLike | None = None) -> jax.Array:
        """``effective_kernel`` viewed as a matrix [fan_in, fan_out]."""
        return self.effective_kernel(dtype).reshape(self.fan_in, self.fan_out)

    def __call__(self, x: jax.Array, ctx: Any = None, *, preferred_element_type=None) -> jax.Array:
        """Project ``x`` [..., *in] to [..., *out] in the compute dtype.

        Args:
          x: input whose trailing dims equal ``in_shape``.
          ctx: the call context (read by adapters, e.g. per-sequence ids).
          preferred_element_type: accumulation / result dtype of the matmul (LM head: fp32).
        """
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in :] != self.in_shape:
            raise ValueError(f"Linear input {x.shape} must end with in_shape {self.in_shape}")
        dt = self.dtype or x.dtype
        x = x.astype(dt)
        if self.form is not None and self.adapter is None:  # through the factors, no W formed
            lead = x.shape[: x.ndim - n_in]
            x_NM = x.reshape(math.prod(lead), self.fan_in)
            y_NN = self.form.project(x_NM, preferred_element_type=preferred_element_type)
            y = y_NN.reshape(*lead, *self.out_shape)
            w = None
        else:
            w = self.base_kernel(dt)
            y = dense(x, w, n_in, preferred_element_type=preferred_element_type)
        if self.bias is not None:
            y = y + cast(self.bias[...], y.dtype)
        if self.adapter is not None:
            delta = self.adapter.delta(x, ctx, base=w)
            if delta is not None:  # None: no change (merged, disabled or inactive adapters)
                y = y + delta.astype(y.dtype)
        return y
