"""Flash attention in Pallas: TPU (Mosaic) and NVIDIA Hopper (Mosaic GPU) forward and backward
kernels, block-sparse skipping from declarative mask specs, grouped kv heads.

Public surface:
  flash_attention, unsupported_reason          -- the TPU kernels' entry point and its gate
  flash_attention_gpu, unsupported_reason_gpu  -- the same for the Mosaic GPU kernels
  BlockSizes, gpu_block_sizes                  -- tile sizes, with per-device defaults
  attention_reference                          -- the plain-jnp semantics the kernels are tested on
"""

from pallas_kernels.flash_attention.api import BlockSizes, flash_attention, unsupported_reason
from pallas_kernels.flash_attention.api_gpu import (
    flash_attention_gpu,
    gpu_block_sizes,
    unsupported_reason_gpu,
)
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = [
    "BlockSizes",
    "flash_attention",
    "flash_attention_gpu",
    "gpu_block_sizes",
    "unsupported_reason",
    "unsupported_reason_gpu",
    "attention_reference",
]
