"""Sigma's DiffQKV attention (Lin et al. 2025, arXiv 2501.13629): the ``"diffqkv"`` kind.

DiffQKV compresses keys and values differently: K_k key heads of dim H and K_v value heads of
dim V, each dividing the N query heads (query head n reads key head n // (N / K_k) and value
head n // (N / K_v); ``jaxattn.dot_product_attention`` takes them as they are, neither repeated
in memory). The cache holds K_k·H + K_v·V numbers per token (``KVCache.bytes_per_token``):
versus GQA's 2·K·H, e.g. fewer key heads than value heads, or thinner keys than values, the
paper's finding that the model is less sensitive to compressing K than V.

Augmented Q (``augmented_q_dim`` = A > H): the queries are projected to a wider head first and
back to the key dim,

    q_n = act(x W_qa,n) · W_qb,        W_qa [D, N, A],  W_qb [A, H] (shared by the heads)

so the Q side gains parameters (and, with a non-linear ``act``, capacity) while the scores, the
cache and decoding stay at dim H. Not checked against the paper's equations: how the wider Q
meets the K dim is not in the abstract (PAPERS.md §1 †); the form above (a back-projection,
optionally with an activation, default linear) is this implementation's reading. Checked: with
K_k = K_v, equal dims and no augmentation it is the "mha" kind exactly; with act = identity and
W_qb = [I; 0] it is the un-augmented layer (the back-projection is exact).

Everything else (RoPE over H, qk-norm, windows, caches, the op's backends) is the "mha" kind's;
the Pallas kernels do not serve K_k != K_v ("auto" falls back, a named kernel raises, in
``jaxattn.ops``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from flax import nnx

from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import register_kind
from jaxattn.layers._linear import Linear

__all__ = ["DiffQKVConfig", "DiffQKVAttention"]

_ACTIVATIONS = {"none": lambda x: x, "silu": jax.nn.silu}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffQKVConfig(AttentionConfig):
    """:class:`AttentionConfig` (``num_kv_heads`` = K_k, ``num_v_heads`` = K_v, ``head_dim``
    = H, ``v_head_dim`` = V) plus augmented Q (the ``"diffqkv"`` kind).

    Attributes:
      augmented_q_dim: A, the wider query head dim (None: no augmentation); A > H.
      augmented_q_activation: "none" (linear) or "silu", between the two Q projections.
    """

    kind: ClassVar[str] = "diffqkv"

    augmented_q_dim: int | None = None
    augmented_q_activation: str = "none"

    def __post_init__(self):
        super().__post_init__()
        o = type(self).__name__
        a = self.augmented_q_dim
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a <= self.h):
            raise ValueError(f"{o}.augmented_q_dim={a!r} must be an int > head_dim={self.h}")
        if self.augmented_q_activation not in _ACTIVATIONS:
            raise ValueError(
                f"{o}.augmented_q_activation={self.augmented_q_activation!r} must be one of "
                f"{sorted(_ACTIVATIONS)}"
            )

    @property
    def cache_numbers_per_token(self) -> int:
        """K_k·H + K_v·V: what one token costs the cache, in numbers (times the itemsize)."""
        return self.n_kv * self.h + self.n_v * self.v

    def build(self, *, rngs: nnx.Rngs) -> DiffQKVAttention:
        """The :class:`DiffQKVAttention` module of this config."""
        return DiffQKVAttention(self, rngs=rngs)


register_kind("diffqkv", DiffQKVConfig)


class DiffQKVAttention(Attention):
    """The "mha" layer with separate K / V heads and dims and augmented Q (module docstring).

    Parameters: those of :class:`Attention`; with augmentation ``q`` is [D, N, A] and
    ``q_back`` [A, H].
    """

    def __init__(self, config: DiffQKVConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config
        if c.augmented_q_dim is not None:
            common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
            self.q = Linear(
                (c.d_model,),
                (c.n_q, c.augmented_q_dim),
                axes=("embed", "heads", None),
                use_bias=c.qkv_bias,
                **common,
            )
            self.q_back = Linear((c.augmented_q_dim,), (c.h,), axes=(None, "head_dim"), **common)

    def project(self, x_BTD: jax.Array, ctx: Context):
        """q_BTNH (augmented: act(x W_qa) W_qb) and (k_BTKH, v_BTKV)."""
        c = self.config
        q, kv = super().project(x_BTD, ctx)
        if c.augmented_q_dim is not None:  # q [B, T, N, A] -> [B, T, N, H]
            q = self.q_back(_ACTIVATIONS[c.augmented_q_activation](q), ctx)
        return q, kv
