"""LoRA-SB: B·R·A with frozen B, A from the SVD of the first full fine-tuning update; only R trains.

Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma, "Initialization using Update
Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning"
(arXiv:2411.19557; official code github.com/RaghavSinghal10/lora-sb). The LoRA-XS
architecture: for a ``Linear`` W [*in, *out] (fan_in x fan_out as a matrix),

    Δy = ((x·a)·r)·b                      ΔK = a·r·b      (no alpha / rank scale)

with ``a`` [*in, k] and ``b`` [k, *out] frozen and only ``r`` [k, k] trained (k the rank; k²
trainable numbers per adapted matrix). The initialisation (:func:`lora_sb_init`) approximates
the first step of full fine-tuning: with G = Σ_batches ∂L/∂W (the gradient of every adapted
kernel accumulated over calibration batches) the first full update is

    ΔW₁ = −η·sign(G)   (``update="adam"``: Adam's first step, the official code's choice)
    ΔW₁ = −η·G         (``update="sgd"``)

and with its SVD ΔW₁ = U S Vᵀ (as [fan_in, fan_out]): a = U_k, r = S_k (diagonal), b = V_kᵀ,
so ΔK = U_k S_k V_kᵀ is the best rank-k approximation of ΔW₁ (Eckart-Young) and the adapted
model starts at W + [ΔW₁]_k. (In PyTorch's [out, in] layout this is B = V_k, R = S_k, A = U_kᵀ;
here ``r`` is the transpose of the paper's R.) Because a and b are frozen with orthonormal
columns/rows, ∂L/∂r = aᵀ·(∂L/∂W)·bᵀ, the projection of the full gradient onto the subspace.

Before :func:`lora_sb_init` (e.g. ``train.finetune --adapter lorasb``, which builds adapters
before loading the base), a and b are random orthonormal (seeded by ``seed`` and the path) and
r = 0: an exact no-op that trains r only (LoRA-XS with a random basis, not the gradient init).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import Linear
from jaxattn.lowrank._factors import RANK_AXIS, factor, kernel_axes
from jaxattn.lowrank._registry import MethodConfig, register_method
from jaxattn.lowrank.methods._seeds_common import check_rank, contract, fold_key, outer

__all__ = ["LoRASBConfig", "LoRASBAdapter", "first_update", "lora_sb_init"]

UPDATES = ("adam", "sgd")


@register_method("lorasb")
@dataclasses.dataclass(frozen=True)
class LoRASBConfig(MethodConfig):
    """LoRA-SB's hyper-parameters.

    Attributes:
      rank: k, 1 <= k <= min(fan_in, fan_out) (k² trainable parameters per matrix).
      lr: η of the approximated first full fine-tuning update (> 0).
      update: ``"adam"`` (ΔW₁ = −η·sign(G), as the official code) or ``"sgd"`` (−η·G).
      seed: seed of the random orthonormal a, b used before :func:`lora_sb_init`.
    """

    rank: int = 8
    lr: float = 1e-3
    update: str = "adam"
    seed: int = 0

    def training_rules(self) -> tuple[str, ...]:
        """AdamW on ``r`` alone; a, b and the base frozen."""
        return ("adamw:adapter/(adapters/[^/]+/)?r$", "frozen:.*")

    def validate(self, path: str, linear: Linear) -> None:
        check_rank(path, linear, self.rank, min(linear.fan_in, linear.fan_out))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lorasb at {path!r}: lr must be a number > 0, got {self.lr!r}")
        if self.update not in UPDATES:
            raise ValueError(
                f"lorasb at {path!r}: update must be one of {UPDATES}, got {self.update!r}"
            )

    def build(self, path: str, linear: Linear, *, rngs: nnx.Rngs) -> LoRASBAdapter:
        self.validate(path, linear)
        k = self.rank
        fi, fo = linear.fan_in, linear.fan_out
        z = jax.random.normal(fold_key(self.seed, path), (fi + fo, k), jnp.float32)
        # jnp, not numpy: train.step builds the model under jit (abstract values)
        qa, _ = jnp.linalg.qr(z[:fi])
        qb, _ = jnp.linalg.qr(z[fi:])
        return LoRASBAdapter(linear, qa, jnp.zeros((k, k)), qb.T, lr=self.lr, update=self.update)


class LoRASBAdapter(nnx.Module):
    """The LoRA-SB adapter of one ``Linear``: ``a`` [*in, k], ``r`` [k, k], ``b`` [k, *out]
    (fp32 ``AdapterParam``; a and b are frozen by :meth:`LoRASBConfig.training_rules`)."""

    def __init__(self, linear: Linear, a, r, b, *, lr: float, update: str):
        in_ax, out_ax = kernel_axes(linear)
        self.n_in = len(linear.in_shape)
        self.in_shape, self.out_shape = linear.in_shape, linear.out_shape
        self.lr, self.update = float(lr), str(update)
        k = r.shape[0]
        self.a = factor(jnp.reshape(a, linear.in_shape + (k,)), in_ax + (RANK_AXIS,))
        self.r = factor(r, (RANK_AXIS, RANK_AXIS))
        self.b = factor(jnp.reshape(b, (k,) + linear.out_shape), (RANK_AXIS,) + out_ax)

    def delta(self, x: jax.Array, ctx=None, *, base: jax.Array) -> jax.Array:
        """``Δy`` [..., *out] = ((x·a)·r)·b of ``x`` [..., *in] in x's dtype."""
        h = contract(contract(x, self.a[...], self.n_in), self.r[...], 1)
        return contract(h, self.b[...], 1)

    def delta_kernel(self, base: jax.Array) -> jax.Array:
        """``ΔK`` [*in, *out] = a·r·b in fp32."""
        return outer(self.a[...], jnp.tensordot(self.r[...], self.b[...], 1))

    def set_from_update(self, update: jax.Array) -> jax.Array:
        """a, r, b ← the rank-k truncated SVD of ``update`` [*in, *out]; returns its singular
        values (all of them, descending)."""
        k = self.r.shape[0]
        fi, fo = self.a[...].size // k, self.b[...].size // k
        u, s, vh = jnp.linalg.svd(jnp.reshape(update.astype(jnp.float32), (fi, fo)),
                                  full_matrices=False)  # fmt: skip
        self.a[...] = jnp.reshape(u[:, :k], self.a.shape)
        self.r[...] = jnp.diag(s[:k])
        self.b[...] = jnp.reshape(vh[:k], self.b.shape)
        return s


def first_update(grad: jax.Array, lr: float, update: str = "adam") -> jax.Array:
    """ΔW₁, the first full fine-tuning update of a kernel with accumulated gradient ``grad``:
    −lr·sign(grad) (``"adam"``) or −lr·grad (``"sgd"``), fp32, ``grad``'s shape.

    Raises:
      ValueError: ``update`` not one of ``adam``, ``sgd``; ``lr`` <= 0.
    """
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    g = grad.astype(jnp.float32)
    return -float(lr) * (jnp.sign(g) if update == "adam" else g)


def lora_sb_init(model: nnx.Module, loss_fn, batches, *, name: str = "default") -> dict:
    """Initialise every LoRA-SB adapter ``name`` of ``model`` from the first full update.

    G = Σ_b ∂ loss_fn(model, b) / ∂W over ``batches`` (one batch or a list), by ``jax.grad``
    w.r.t. the adapted kernels only, taken at the current weights with r = 0 (the adapters
    are zeroed first, so G is the base model's gradient); then ΔW₁ = :func:`first_update` and
    a, r, b ← its rank-k truncated SVD (see the module docstring).

    Args:
      model: a model with LoRA-SB adapters applied (``lowrank.apply``, method ``lorasb``).
      loss_fn: ``loss_fn(model, batch) -> scalar``.
      batches: one batch or a list/tuple of batches (the calibration set).
      name: the adapter name.

    Returns:
      ``{path: ΔW₁}`` of every initialised projection ([*in, *out], fp32).

    Raises:
      ValueError: no projection holds a LoRA-SB adapter named ``name`` (or it is merged).
    """
    from jaxattn.lowrank._apply import holding
    from jaxattn.lowrank._surgery import per_kernel, split_kernels

    held = {
        p: lin
        for p, lin in holding(model, name, op="lora_sb_init").items()
        if isinstance(lin.adapter.adapters[name], LoRASBAdapter)
    }
    if not held:
        raise ValueError(f"lora_sb_init: no projection holds a lorasb adapter named {name!r}")
    ads = {p: lin.adapter.adapters[name] for p, lin in held.items()}
    for ad in ads.values():
        ad.r[...] = jnp.zeros_like(ad.r[...])
    graphdef, kernels, rest = split_kernels(model, held)

    def loss(ks, batch):
        return loss_fn(nnx.merge(graphdef, ks, rest), batch)

    grad_fn = jax.jit(jax.grad(loss))  # one compile for every calibration batch
    batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
    total = None
    for batch in batches:
        g = grad_fn(kernels, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    grads = per_kernel(model, total, held)
    out = {}
    for p in held:
        g = grads[p]
        upd = first_update(g, ads[p].lr, ads[p].update)
        ads[p].set_from_update(upd)
        out[p] = upd
    return out
