"""``molora``: Phi-4's Mixture-of-LoRAs, several LoRAs on one frozen base.

Microsoft, "Phi-4-Mini Technical Report: Compact yet Powerful Multimodal Language Models via
Mixture-of-LoRAs" (arXiv:2503.01743). Each modality (vision, speech, ...) adds its own LoRA
(Hu et al. 2021) to the same frozen language model, and a router picks which LoRA a token goes
through, so modalities never interfere and the base is unchanged when none is picked. n LoRAs
a_i [*in, r], b_i [r, *out] (b_i = 0 at init) with scale s = alpha / r; two routings:

  * ``routing="tag"`` (the paper's modality routing): row b of the batch carries a tag
    ``i_b = ctx.sequence_ids_B[b]`` (-1: no adapter, the base row) and

        delta[b] = s · (x[b] · a_{i_b}) · b_{i_b}

    (a gather of the row's factors, one LoRA's cost per row, as ``lora_bank``).
  * ``routing="router"`` (a learned per-token router): gate logits l = x · w_r [..., n]
    (``w_r`` [*in, n] an ``AdapterParam``, zero-init), the top-k logits kept and softmaxed
    among themselves (Mixtral's top-k gate), g = 0 elsewhere, and

        delta(x) = s · Σ_i g_i(x) · (x · a_i) · b_i

    (computed densely for the n adapters; n is small). With top_k=1 the chosen gate is exactly
    1, so a one-hot router gives the chosen LoRA itself (and no gradient to the router:
    train the router with top_k >= 2 or from tags).

Gradients reach only the adapters a row / token picks (the others are multiplied by an exact
zero). A mixed batch has no single weight change: ``delta_kernel`` raises unless n == 1 (tag
routing); ``delta_kernel_of(i)`` merges LoRA i (Phi-4's merged single-modality weights).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import Linear
from jaxattn.lowrank._factors import RANK_AXIS, factor, kernel_axes
from jaxattn.lowrank._registry import MethodConfig, register_method
from jaxattn.lowrank.methods._seeds_common import check_rank, down_init
from jaxattn.lowrank.methods.lora_bank import gathered_delta, row_ids

__all__ = ["MoLoRAConfig", "MoLoRAAdapter", "ROUTINGS"]

ROUTINGS = ("tag", "router")


class MoLoRAAdapter(nnx.Module):
    """n LoRAs of one ``Linear`` with tag or router routing (module docstring formulas).

    Attributes:
      a: ``AdapterParam`` [n, *in, r];  b: ``AdapterParam`` [n, r, *out];
      router: ``AdapterParam`` [*in, n] (router routing) or None.
      scaling: s; routing: "tag" | "router"; top_k: gates kept per token.
    """

    def __init__(self, a, b, *, in_shape, out_shape, scaling, routing, top_k=1, router=None):
        self.a, self.b = a, b
        self.router = nnx.data(router)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.num_adapters = int(a.shape[0])
        self.rank = int(a.shape[-1])
        self.scaling = float(scaling)
        self.routing = routing
        self.top_k = int(top_k)

    def _mats(self, dt):
        fi, fo = math.prod(self.in_shape), math.prod(self.out_shape)
        a = self.a[...].reshape(self.num_adapters, fi, self.rank).astype(dt)
        b = self.b[...].reshape(self.num_adapters, self.rank, fo).astype(dt)
        return a, b

    def gates(self, x: jax.Array) -> jax.Array:
        """Router gates g [..., n] for x [..., *in] (top-k softmax, 0 off the top k), fp32."""
        if self.router is None:
            raise ValueError("gates() needs routing='router'")
        n_in = len(self.in_shape)
        logits = jnp.tensordot(x.astype(jnp.float32), self.router[...], n_in)  # [..., n]
        kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
        keep = logits >= kth  # ties at the k-th logit keep every tied adapter
        z = jnp.where(keep, logits, -jnp.inf)
        return jnp.where(keep, jax.nn.softmax(z, axis=-1), 0.0)

    def delta(self, x: jax.Array, ctx, *, base=None) -> jax.Array:
        """The output change [..., *out] for x [B, ..., *in], in x's dtype (tag routing under
        jit, where ids cannot be checked: a row with an id outside [-1, n) is NaN)."""
        n_in = len(self.in_shape)
        if x.ndim < n_in + 1 or x.shape[x.ndim - n_in :] != self.in_shape:
            raise ValueError(f"molora input {x.shape} must be [B, ..., *{self.in_shape}]")
        dt = x.dtype
        lead = x.shape[: x.ndim - n_in]
        a, b = self._mats(dt)
        x_bmi = x.reshape(lead[0], -1, a.shape[1])
        s = jnp.asarray(self.scaling, dt)
        if self.routing == "router":
            g = self.gates(x).reshape(lead[0], -1, self.num_adapters).astype(dt)  # [B, M, n]
            h = jnp.einsum("bmi,nir->bmnr", x_bmi, a) * g[..., None]
            y = jnp.einsum("bmnr,nro->bmo", h, b) * s
        else:
            ids = row_ids(ctx, x, self.num_adapters, "molora with routing='tag'")
            gain = jnp.full((self.num_adapters, self.rank), self.scaling, jnp.float32)
            y = gathered_delta(x_bmi, a, b, gain, ids)
        return y.reshape(*lead, *self.out_shape)

    def delta_kernel_of(self, i: int) -> jax.Array:
        """LoRA i's weight change s · a_i · b_i as [*in, *out] (fp32)."""
        if not 0 <= int(i) < self.num_adapters:
            raise ValueError(f"adapter index i={i} must lie in [0, {self.num_adapters})")
        a, b = self._mats(jnp.float32)
        return (self.scaling * a[i] @ b[i]).reshape(*self.in_shape, *self.out_shape)

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """The weight change of a one-LoRA tag mixture; otherwise there is none (raises)."""
        if self.num_adapters == 1 and self.routing == "tag":
            return self.delta_kernel_of(0).astype(base.dtype)
        raise ValueError(
            f"molora ({self.routing} routing, {self.num_adapters} adapters) has no single delta "
            "kernel; merge one LoRA with delta_kernel_of(i)"
        )


@register_method("molora")
@dataclasses.dataclass(frozen=True)
class MoLoRAConfig(MethodConfig):
    """Mixture-of-LoRAs hyper-parameters.

    Attributes:
      num_adapters: n >= 1 LoRAs (one per modality / task).
      rank: r of every LoRA, 1 <= r <= min(fan_in, fan_out).
      alpha: s = alpha / r.
      routing: "tag" (per-sequence ``ctx.sequence_ids_B``) or "router" (learned per token).
      top_k: gates kept per token (router routing), 1 <= top_k <= n.
    """

    num_adapters: int = 2
    rank: int = 8
    alpha: float = 8.0
    routing: str = "tag"
    top_k: int = 1

    def validate(self, path: str, linear: Linear) -> None:
        n = self.num_adapters
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"molora at {path!r}: num_adapters must be an int >= 1, got {n!r}")
        check_rank(path, linear, self.rank, min(linear.fan_in, linear.fan_out))
        if self.routing not in ROUTINGS:
            raise ValueError(
                f"molora at {path!r}: routing must be one of {ROUTINGS}, got {self.routing!r}"
            )
        if self.routing == "router":
            check_rank(path, linear, self.top_k, n, name="top_k")
        if self.alpha == 0:
            raise ValueError(f"molora at {path!r}: alpha must be nonzero")

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> MoLoRAAdapter:
        n, r = self.num_adapters, self.rank
        in_ax, out_ax = kernel_axes(linear)
        keys = jax.random.split(rngs.params(), n)
        a = jnp.stack([down_init(k, linear.in_shape, r) for k in keys])
        b = jnp.zeros((n, r, *linear.out_shape), jnp.float32)
        router = None
        if self.routing == "router":
            router = factor(jnp.zeros((*linear.in_shape, n), jnp.float32), (*in_ax, None))
        return MoLoRAAdapter(
            factor(a, (None, *in_ax, RANK_AXIS)),
            factor(b, (None, RANK_AXIS, *out_ax)),
            in_shape=linear.in_shape,
            out_shape=linear.out_shape,
            scaling=self.alpha / r,
            routing=self.routing,
            top_k=self.top_k,
            router=router,
        )
