"""LoRA (Hu et al. 2021) with the PEFT variants: rsLoRA, PiSSA, OLoRA and DoRA initialisations.

Shapes: a ``Linear`` kernel W [*in, *out] (fan_in x fan_out as a matrix) gets factors
``a`` [*in, r] and ``b`` [r, *out] (fp32 ``AdapterParam``; axes from the kernel, rank replicated)::

    delta(x) = s * (drop(x) · a) · b,      s = alpha / r   (rsLoRA: alpha / sqrt(r))

PEFT conventions (``peft.tuners.lora.layer.LoraLayer``; PEFT stores A [r, in] = aᵀ and
B [out, r] = bᵀ):
  * ``kaiming``: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0.
  * ``gaussian``: A ~ N(0, std = 1/r), B = 0.
  * ``zero``: A = B = 0 (test / identity init; no gradient flows to either factor).
  * ``pissa`` (Meng et al. 2024): W = U S Vᵀ (as [out, in]); A = sqrt(S_r / s) V_rᵀ,
    B = U_r sqrt(S_r / s); the base becomes W_res = W - s·BA (``LoRAConfig.init_base``).
  * ``olora`` (Büyükakyüz 2024): W = Q R (as [out, in]); A = R[:r], B = Q[:, :r];
    W_res = W - s·BA.
  * DoRA (Liu et al. 2024): magnitude m [*out] = ||W + s·BA|| per output feature (norm over the
    input dims), and ``W' = m / ||W + s·BA|| ⊙ (W + s·BA)`` with the norm detached in the
    forward (PEFT ``DoraLinearLayer``), i.e.
    ``delta(x) = (m/n - 1) ⊙ (x̃·W) + (m/n) ⊙ s·(x̃·a)·b`` with x̃ the dropped-out input.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._context import dropout as _dropout
from jaxattn.lowrank._factors import RANK_AXIS, factor, kernel_axes
from jaxattn.lowrank._registry import MethodConfig, register_method
from jaxattn.lowrank.methods._seeds_common import contract, down_init

__all__ = ["LoRAConfig", "LoRAAdapter"]

INITS = ("kaiming", "gaussian", "pissa", "olora", "zero")


class LoRAAdapter(nnx.Module):
    """The LoRA / DoRA adapter of one ``Linear`` (see the module docstring for the formulas).

    Attributes:
      a: ``AdapterParam`` [*in, r];  b: ``AdapterParam`` [r, *out];
      magnitude: DoRA ``AdapterParam`` [*out] (None without DoRA).
      scaling: s (static float); rate: dropout rate; tag: dropout site tag (from the path).
    """

    def __init__(self, a, b, *, n_in, scaling, rate=0.0, tag=0, magnitude=None):
        self.a = a
        self.b = b
        self.magnitude = nnx.data(magnitude)
        self.n_in = int(n_in)
        self.scaling = float(scaling)
        self.rate = float(rate)
        self.tag = int(tag)

    @property
    def use_dora(self) -> bool:
        return self.magnitude is not None

    def lowrank_kernel(self, dtype=jnp.float32) -> jax.Array:
        """s · a·b as [*in, *out] in ``dtype``."""
        a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
        return (self.scaling * contract(a, b, 1)).astype(dtype)

    def weight_norm(self, base: jax.Array) -> jax.Array:
        """||W + s·a·b|| per output feature [*out] (fp32, norm over the input dims)."""
        w = base.astype(jnp.float32) + self.lowrank_kernel(jnp.float32)
        return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(self.n_in))))

    def delta(self, x: jax.Array, ctx, *, base: jax.Array) -> jax.Array:
        """The output change [..., *out] for x [..., *in], computed in x's dtype."""
        key = None if ctx is None else ctx.key(self.tag)
        xd = _dropout(x, self.rate, key) if self.rate > 0.0 else x
        dt = x.dtype
        h = contract(xd, self.a[...].astype(dt), self.n_in)
        y = contract(h, self.b[...].astype(dt), 1) * jnp.asarray(self.scaling, dt)
        if not self.use_dora:
            return y
        scale = self.magnitude[...] / jax.lax.stop_gradient(self.weight_norm(base))
        scale = scale.astype(dt)
        return (scale - 1) * contract(xd, base.astype(dt), self.n_in) + scale * y

    def affine(self, norm=None):
        """(c, d) with ``delta_kernel(W) = W ⊙ c + d`` (c [*out] or 0); DoRA needs ``norm``,
        the ``weight_norm`` of the W the adapter was trained against (kept by merge)."""
        lk = self.lowrank_kernel(jnp.float32)
        if not self.use_dora:
            return jnp.zeros((), jnp.float32), lk
        scale = self.magnitude[...].astype(jnp.float32) / norm
        return scale - 1, scale * lk

    def merge_state(self, base: jax.Array):
        """What unmerge needs besides the adapter: DoRA's weight norm at ``base``, else None."""
        return self.weight_norm(base) if self.use_dora else None

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """The same change as a weight [*in, *out] in ``base``'s dtype."""
        c, d = self.affine(self.merge_state(base))
        return (base.astype(jnp.float32) * c + d).astype(base.dtype)


@register_method("lora")
@dataclasses.dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA hyper-parameters (PEFT ``LoraConfig`` names).

    Attributes:
      rank: r >= 1, at most min(fan_in, fan_out).
      alpha: s = alpha / r (rsLoRA: alpha / sqrt(r)).
      use_rslora: rank-stabilised scaling (Kalajdzievski 2023).
      dropout: dropout rate on the adapter's input, in [0, 1) (active when ``ctx.rng`` is set).
      init: one of ``kaiming``, ``gaussian``, ``pissa``, ``olora``, ``zero``.
      use_dora: add DoRA's magnitude vector.
    """

    rank: int = 8
    alpha: float = 8.0
    use_rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming"
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def validate(self, path, linear) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora at {path!r}: rank must be an int >= 1, got {self.rank!r}")
        top = min(linear.fan_in, linear.fan_out)
        if self.rank > top:
            raise ValueError(
                f"lora at {path!r}: rank={self.rank} exceeds min(fan_in, fan_out)={top} "
                f"of kernel {linear.in_shape} -> {linear.out_shape}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora at {path!r}: dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"lora at {path!r}: init must be one of {INITS}, got {self.init!r}")
        if self.alpha == 0:
            raise ValueError(f"lora at {path!r}: alpha must be nonzero")

    def build(self, path, linear, *, rngs: nnx.Rngs) -> LoRAAdapter:
        r, s = self.rank, self.scaling
        fi, fo = linear.fan_in, linear.fan_out
        in_ax, out_ax = kernel_axes(linear)
        if self.init in ("pissa", "olora"):
            w = linear.base_kernel(jnp.float32).reshape(fi, fo).T  # PEFT's [out, in]
            if self.init == "pissa":
                u, sv, vh = jnp.linalg.svd(w, full_matrices=False)
                root = jnp.sqrt(sv[:r] / s)
                a_ri = root[:, None] * vh[:r]  # A [r, in]
                b_or = u[:, :r] * root[None, :]  # B [out, r]
            else:
                q, rr = jnp.linalg.qr(w)
                a_ri, b_or = rr[:r], q[:, :r]
            a, b = a_ri.T, b_or.T
        else:
            b = jnp.zeros((r, fo), jnp.float32)
            if self.init == "kaiming":
                a = down_init(rngs.params(), (fi,), r)
            elif self.init == "gaussian":
                a = jax.random.normal(rngs.params(), (fi, r), jnp.float32) / r
            else:
                a = jnp.zeros((fi, r), jnp.float32)
        a = factor(a.reshape(linear.in_shape + (r,)), in_ax + (RANK_AXIS,))
        b = factor(b.reshape((r,) + linear.out_shape), (RANK_AXIS,) + out_ax)
        ad = LoRAAdapter(
            a,
            b,
            n_in=len(linear.in_shape),
            scaling=s,
            rate=self.dropout,
            tag=zlib.crc32(path.encode()) & 0x7FFFFFFF,
        )
        if self.use_dora:
            w = self.init_base(path, linear, ad)
            if w is None:
                w = linear.base_kernel(jnp.float32)
            ad.magnitude = factor(ad.weight_norm(w), out_ax)
        return ad

    def init_base(self, path, linear, adapter):
        """The new base kernel [*in, *out] the method needs (PiSSA / OLoRA: W - s·a·b), or
        None to keep it. ``lowrank.apply`` writes it into the ``Linear``."""
        if self.init not in ("pissa", "olora"):
            return None
        return linear.base_kernel(jnp.float32) - adapter.lowrank_kernel(jnp.float32)
