"""Decode attention (flash-decoding) for TPU and GPU: few queries per sequence over a long KV
cache.

Public surface:

* ``decode_attention_tpu`` — the kernel entry point (Pallas Mosaic TPU, ``interpret=`` on CPU);
* ``decode_attention_gpu`` / ``unsupported_reason_gpu`` — the same on Hopper (Mosaic GPU);
* ``DecodeKernelBlockSizes`` — its tunables; ``unsupported_reason`` — can it serve a call;
* ``decode_attention_reference`` — the plain-jnp fp32 oracle.

Importing this package loads no Pallas module; the kernels are imported when called.
"""

from pallas_kernels.decode_attention.api import (
    DecodeKernelBlockSizes,
    decode_attention_tpu,
    unsupported_reason,
)
from pallas_kernels.decode_attention.api_gpu import decode_attention_gpu, unsupported_reason_gpu
from pallas_kernels.decode_attention.reference import decode_attention_reference

__all__ = [
    "DecodeKernelBlockSizes",
    "decode_attention_tpu",
    "decode_attention_gpu",
    "decode_attention_reference",
    "unsupported_reason",
    "unsupported_reason_gpu",
]
