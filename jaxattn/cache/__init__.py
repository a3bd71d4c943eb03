"""jaxattn.cache: fixed-capacity, jit-friendly KV caches with per-sequence lengths.

Caches are pytrees of fixed-shape buffers: build one with ``create``, ``write`` new rows at each
sequence's length, then ``advance`` the lengths. ``bytes_per_token()`` is the per-layer cost.

Dense (MHA / GQA / MQA / SQA)
  KVCache       keys and values, K·(H + V) numbers per token
Latent (MLA)
  LatentCache   normalised latent and decoupled rope key, L + P numbers per token
"""

from jaxattn.cache._dense import KVCache
from jaxattn.cache._latent import LatentCache

__all__ = ["KVCache", "LatentCache"]
