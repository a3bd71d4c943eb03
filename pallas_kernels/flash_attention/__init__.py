"""Flash attention for TPU in Pallas (Mosaic): forward and backward kernels, block-sparse
skipping from declarative mask specs, grouped kv heads.

Public surface:
  flash_attention, unsupported_reason  -- the kernel entry point and its gate
  BlockSizes                           -- tile sizes, with per-generation defaults
  attention_reference                  -- the plain-jnp semantics the kernels are tested on
"""

from pallas_kernels.flash_attention.api import BlockSizes, flash_attention, unsupported_reason
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = ["BlockSizes", "flash_attention", "unsupported_reason", "attention_reference"]
