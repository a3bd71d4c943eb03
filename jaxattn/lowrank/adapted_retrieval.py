"""Adapted Dense Retrieval (ADDER): a low-rank residual on a frozen, black-box embedding.

Khatry, Gulwani, Le, Verbruggen et al., "Augmented Embeddings for Custom Retrievals"
(arXiv:2310.05380; "ADDER: Adapted Dense Retrieval", ICLR 2024 submission). A pre-trained
embedding e = φ(x) [d] (only its outputs are seen) is transformed for one retrieval task by a
residual of rank <= h:

    Tr(e) = e + softmax(e·Kᵀ)·V          K [h, d] keys, V [h, d] values   (``residual="kv"``)

the paper's key-value lookup: each embedding attends over h learned keys and adds a mix of h
learned value vectors, so over any set of N embeddings the residual matrix [N, d] is
(softmax weights [N, h])·V and has rank <= h. ``residual="linear"`` is the plain low-rank
residual ``e + e·A·B`` (A [d, h], B [h, d]) for comparison. V (resp. B) starts at 0, so a new
adapter is the identity map.

Retrieval scores are cosine similarities s(q, c) = ⟨Tr_q(q), Tr_c(c)⟩ / (‖·‖‖·‖); ADDER adapts
the query side only (``adapt="query"``), ADDER² adapts both sides with separate adapters
(``adapt="both"``, for heterogeneous query / corpus types such as NL and code). Training is a
contrastive loss with global negatives: for query i with relevant corpus item j_i,

    ℒ = −(1/N) Σ_i log softmax_j(s(q_i, c_j) / τ)[j_i]      over the whole corpus.

Only the adapters train; the embedding model is never differentiated (it is not even called
here: inputs are its embeddings).

Not checked against the paper's text: the key-value form of Tr is written from the paper's
description (a rank-limited residual on the embedding, PAPERS.md §7); what is tested is what
PAPERS.md asks (zero init == identity, residual rank <= h, only the adapter trains).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import AdapterParam

__all__ = ["AdderConfig", "ResidualAdapter", "AdaptedRetriever", "contrastive_loss", "top_k"]

RESIDUALS = ("kv", "linear")
ADAPTS = ("query", "both")


@dataclasses.dataclass(frozen=True)
class AdderConfig:
    """ADDER hyper-parameters.

    Attributes:
      dim: d, the embedding width (>= 1).
      rank: h, the number of keys / the residual's rank bound, 1 <= h.
      residual: "kv" (the paper's softmax key-value lookup) or "linear" (e·A·B).
      adapt: "query" (ADDER) or "both" (ADDER², separate query / corpus adapters).
      temperature: τ > 0 of the contrastive loss.
    """

    dim: int
    rank: int = 16
    residual: str = "kv"
    adapt: str = "query"
    temperature: float = 0.05

    def __post_init__(self):
        for name in ("dim", "rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if self.adapt not in ADAPTS:
            raise ValueError(f"adapt must be one of {ADAPTS}, got {self.adapt!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


class ResidualAdapter(nnx.Module):
    """``Tr(e) = e + residual(e)`` for e [..., d] (module docstring), fp32 parameters.

    kv: ``keys`` [h, d] ~ N(0, 1/d), ``values`` [h, d] = 0; linear: ``down`` [d, h] ~ N(0, 1/d),
    ``up`` [h, d] = 0 (all ``AdapterParam``).
    """

    def __init__(self, config: AdderConfig, *, rngs: nnx.Rngs):
        d, h = config.dim, config.rank
        self.kind = config.residual
        init = jax.random.normal(rngs.params(), (h, d), jnp.float32) / jnp.sqrt(d)
        if self.kind == "kv":
            self.keys = AdapterParam(init)
            self.values = AdapterParam(jnp.zeros((h, d), jnp.float32))
        else:
            self.down = AdapterParam(init.T)
            self.up = AdapterParam(jnp.zeros((h, d), jnp.float32))
        self.dim = d

    def residual(self, e: jax.Array) -> jax.Array:
        """The residual [..., d] of e [..., d]: softmax(e·Kᵀ)·V or e·A·B."""
        if e.shape[-1] != self.dim:
            raise ValueError(f"embedding e {e.shape} must end with dim={self.dim}")
        e = e.astype(jnp.float32)
        if self.kind == "kv":
            w = jax.nn.softmax(e @ self.keys[...].T, axis=-1)  # [..., h]
            return w @ self.values[...]
        return (e @ self.down[...]) @ self.up[...]

    def __call__(self, e: jax.Array) -> jax.Array:
        return e.astype(jnp.float32) + self.residual(e)


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class AdaptedRetriever(nnx.Module):
    """Query (and, for ``adapt="both"``, corpus) adapters over frozen embeddings."""

    def __init__(self, config: AdderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.query = ResidualAdapter(config, rngs=rngs)
        self.corpus = ResidualAdapter(config, rngs=rngs) if config.adapt == "both" else None

    def embed_query(self, q_ND: jax.Array) -> jax.Array:
        return self.query(q_ND)

    def embed_corpus(self, c_MD: jax.Array) -> jax.Array:
        return c_MD.astype(jnp.float32) if self.corpus is None else self.corpus(c_MD)

    def scores(self, q_ND: jax.Array, c_MD: jax.Array) -> jax.Array:
        """Cosine similarities [N, M] of adapted queries and corpus items."""
        return _normalize(self.embed_query(q_ND)) @ _normalize(self.embed_corpus(c_MD)).T


def contrastive_loss(model: AdaptedRetriever, q_ND, c_MD, target_N) -> jax.Array:
    """ℒ = −mean_i log softmax_j(s_ij / τ)[target_i] over the whole corpus (global negatives).

    Args:
      q_ND: query embeddings [N, d];  c_MD: corpus embeddings [M, d];
      target_N: int [N], the relevant corpus index of each query.
    """
    target_N = jnp.asarray(target_N)
    if target_N.shape != q_ND.shape[:1] or not jnp.issubdtype(target_N.dtype, jnp.integer):
        raise ValueError(
            f"target_N must be int [{q_ND.shape[0]}], got {target_N.dtype}{target_N.shape}"
        )
    logits = model.scores(q_ND, c_MD) / model.config.temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target_N[:, None], axis=-1))


def top_k(model: AdaptedRetriever, q_ND, c_MD, k: int) -> jax.Array:
    """The indices int [N, k] of the k best corpus items per query (best first)."""
    if not 1 <= k <= c_MD.shape[0]:
        raise ValueError(f"k must be in [1, {c_MD.shape[0]}], got {k}")
    return jax.lax.top_k(model.scores(q_ND, c_MD), k)[1]
