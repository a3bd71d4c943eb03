"""jaxattn: efficient attention and low-rank modules for JAX/Flax.

Public surface:
  dot_product_attention   the attention op (jaxattn.ops)
  masks                   declarative mask specs
  ops                     attention, rotary embeddings, sharded kernel wrappers
  layers                  Flax NNX modules (attention variants, MLA, MLP, norms, embeddings)
  cache                   KV caches (dense, MLA latent)
  generate                sampling loop over a cache (jaxattn.generate.generate)
  sharding                logical axis rules
"""

from jaxattn import cache, layers, masks, ops, sharding
from jaxattn.ops.attention import dot_product_attention

__all__ = ["dot_product_attention", "masks", "ops", "layers", "cache", "sharding"]
__version__ = "0.1.0"
