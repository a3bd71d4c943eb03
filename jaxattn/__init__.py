"""jaxattn: efficient attention and low-rank modules for JAX/Flax.

Public surface:
  dot_product_attention   the attention op (jaxattn.ops)
  masks                   declarative mask specs
  ops                     attention, rotary embeddings, sharded kernel wrappers
  layers                  Flax NNX modules (attention variants, MLA, MLP, norms, embeddings)
  cache                   KV caches (dense, MLA latent)
  generate                sampling loop over a cache (jaxattn.generate.generate)
  sharding                logical axis rules

Example (GQA: 4 query heads share 2 kv heads; a query row that sees no key gives zeros):

>>> import jax.numpy as jnp, jaxattn
>>> from jaxattn import masks
>>> q, k, v = jnp.ones((1, 3, 4, 8)), jnp.ones((1, 3, 2, 8)), jnp.arange(48.0).reshape(1, 3, 2, 8)
>>> o = jaxattn.dot_product_attention(q, k, v, mask=masks.Causal())
>>> o.shape
(1, 3, 4, 8)
>>> float(o[0, 0, 0, 0]), float(o[0, 2, 0, 0])  # row 0 sees key 0; row 2 averages keys 0..2
(0.0, 16.0)
>>> o = jaxattn.dot_product_attention(q, k, v, kv_lengths=jnp.array([0]))
>>> float(abs(o).max())
0.0
"""

from jaxattn import cache, generate, layers, masks, ops, sharding
from jaxattn.ops.attention import dot_product_attention

__all__ = ["dot_product_attention", "masks", "ops", "layers", "cache", "generate", "sharding"]
__version__ = "0.1.0"
