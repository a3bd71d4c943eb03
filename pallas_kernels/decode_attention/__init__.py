"""Decode attention (flash-decoding) for TPU: few queries per sequence over a long KV cache.

Public surface:

* ``decode_attention`` — the kernel entry point (Pallas Mosaic TPU, ``interpret=`` on CPU);
* ``DecodeBlockSizes`` — its tunables; ``unsupported_reason`` — can it serve a call;
* ``decode_attention_reference`` — the plain-jnp fp32 oracle.
"""

from pallas_kernels.decode_attention.api import (
    DecodeBlockSizes,
    decode_attention,
    unsupported_reason,
)
from pallas_kernels.decode_attention.reference import decode_attention_reference

__all__ = [
    "DecodeBlockSizes",
    "decode_attention",
    "decode_attention_reference",
    "unsupported_reason",
]
