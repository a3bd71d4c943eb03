"""jaxattn: efficient attention and low-rank modules for JAX/Flax.

Public surface:
  dot_product_attention   the attention op (jaxattn.ops.attention)
  masks                   declarative mask specs
  sharding                logical axis rules
"""

from jaxattn import masks, sharding
from jaxattn.ops.attention import dot_product_attention

__all__ = ["dot_product_attention", "masks", "sharding"]
__version__ = "0.1.0"
