"""S4 as a sequence-mixing layer: one SSM per channel, convolution for training, scan for decoding.

Gu, Goel and Ré 2022, "Efficiently Modeling Long Sequences with Structured State Spaces", §3
and App. D. The op is ``jaxattn.ops.s4``: per channel h of the width D, a HiPPO-LegS
initialised NPLR state space of state size N (M = N / 2 complex modes), bilinear
discretisation at a learned step Δ_h, the Cauchy-kernel convolution of length L
(``max_length``; C̃ is tied to it) and a skip D_h; then GELU and an output Linear [D, D], as the
paper's S4 block.

Parameters (paths): ``lam_re``, ``lam_im``, ``p``, ``b``, ``c`` ([D, M] each; complex ones as
[D, M, 2] real pairs), ``log_dt`` [D], ``d`` [D], ``out/kernel``. Decoding:
:meth:`S4Layer.init_state` and :meth:`S4Layer.step` carry the complex state [B, D, M] (fixed
size, any context).
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
from jaxattn.ops.s4 import s4_convolve, s4_init, s4_kernel, s4_recurrence, s4_scan

__all__ = ["S4Config", "S4Layer"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class S4Config:
    """Hyper-parameters of :class:`S4Layer`.

    Attributes:
      d_model: width D (one SSM per channel).
      state_size: N, even (conjugate pairs: M = N / 2 complex modes).
      max_length: L, the kernel length (sequences up to L; C̃ = C (I − Ā^L) is tied to L).
      dt_min, dt_max: the range of the log-uniform initial Δ (0 < dt_min <= dt_max).
      dtype: compute dtype of the output projection (None: the input's); param_dtype.
    """

    d_model: int
    state_size: int = 64
    max_length: int = 1024
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        o = type(self).__name__
        v.check_int(o, "d_model", self.d_model)
        v.check_int(o, "state_size", self.state_size, minimum=2)
        if self.state_size % 2:
            raise ValueError(f"{o}.state_size={self.state_size} must be even (conjugate pairs)")
        v.check_int(o, "max_length", self.max_length)
        v.check_float(o, "dt_min", self.dt_min)
        v.check_float(o, "dt_max", self.dt_max)
        if self.dt_min > self.dt_max:
            raise ValueError(f"{o}.dt_min={self.dt_min} must be <= dt_max={self.dt_max}")
        v.check_dtype(o, "dtype", self.dtype, optional=True)
        v.check_dtype(o, "param_dtype", self.param_dtype)

    def build(self, *, rngs: nnx.Rngs) -> S4Layer:
        """The :class:`S4Layer` of this config."""
        return S4Layer(self, rngs=rngs)


def _pair(z):
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).astype(jnp.float32)


class S4Layer(nnx.Module):
    """S4 block: x [B, T, D] -> GELU(SSM(x)) W_out, T <= max_length (see the module docstring)."""

    def __init__(self, config: S4Config, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        # Λ, P, B: HiPPO-LegS (deterministic); C̃ ~ complex normal, log Δ ~ U[log dt_min,
        # log dt_max], drawn from ``rngs`` (traceable, so nnx.eval_shape works)
        init = s4_init(c.d_model, c.state_size, dt_min=c.dt_min, dt_max=c.dt_max)
        m = c.state_size // 2
        self.lam_re = nnx.Param(jnp.asarray(init["lam"].real, c.param_dtype))
        self.lam_im = nnx.Param(jnp.asarray(init["lam"].imag, c.param_dtype))
        self.p = nnx.Param(_pair(init["p"]))
        self.b = nnx.Param(_pair(init["b"]))
        c_pair = jax.random.normal(rngs.params(), (c.d_model, m, 2), c.param_dtype)
        self.c = nnx.Param(c_pair * jnp.sqrt(0.5).astype(c.param_dtype))
        log_dt = jax.random.uniform(
            rngs.params(), (c.d_model,), c.param_dtype, jnp.log(c.dt_min), jnp.log(c.dt_max)
        )
        self.log_dt = nnx.Param(log_dt)
        self.d = nnx.Param(jnp.asarray(init["d"], c.param_dtype))
        d = c.d_model
        self.out = Linear((d,), (d,), axes=("embed", "mlp"), dtype=c.dtype,
                          param_dtype=c.param_dtype, rngs=rngs)  # fmt: skip

    def ssm_params(self):
        """(Λ, P, B, C̃ [D, M] complex64, log Δ [D]) for ``jaxattn.ops.s4``."""
        cplx = lambda x: jax.lax.complex(x[...][..., 0], x[...][..., 1])  # noqa: E731
        # Re Λ < 0 keeps the SSM stable (HiPPO's −1/2); a real part is clipped there
        lam = jax.lax.complex(jnp.minimum(self.lam_re[...], -1e-4), self.lam_im[...])
        return lam, cplx(self.p), cplx(self.b), cplx(self.c), self.log_dt[...]

    def _finish(self, y_BTD, x_BTD, ctx):
        y = jax.nn.gelu(y_BTD).astype(
            x_BTD.dtype if self.config.dtype is None else self.config.dtype
        )
        return self.out(y, ctx)

    def __call__(self, x_BTD: jax.Array, ctx: Context | None = None) -> jax.Array:
        """Convolution mode (Cauchy kernel + FFT): x [B, T, D], T <= max_length -> [B, T, D]."""
        t = x_BTD.shape[1]
        if t > self.config.max_length:
            raise ValueError(f"sequence length {t} exceeds max_length={self.config.max_length}")
        kernel = s4_kernel(*self.ssm_params(), self.config.max_length)
        y = s4_convolve(x_BTD, kernel, self.d[...])
        return self._finish(y, x_BTD, ctx or Context.create(*x_BTD.shape[:2]))

    def init_state(self, batch: int):
        """The zero state [B, D, M] complex64 that :meth:`step` carries."""
        return jnp.zeros((batch, self.config.d_model, self.config.state_size // 2), jnp.complex64)

    def step(self, x_BTD: jax.Array, state, ctx: Context | None = None):
        """Recurrent mode over x [B, T, D] from ``state`` -> (y [B, T, D], state)."""
        a_bar, b_bar, c = s4_recurrence(*self.ssm_params(), self.config.max_length)
        y, state = s4_scan(x_BTD, a_bar, b_bar, c, self.d[...], state)
        return self._finish(y, x_BTD, ctx or Context.create(*x_BTD.shape[:2])), state
