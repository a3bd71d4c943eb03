"""jaxattn.optim: optax GradientTransformations for low-rank training (PAPERS.md §8).

Gradient low-rank projection (jaxattn.optim.galore)
  galore, fira                    GaLore / Fira around any inner transform
  GaLoreState                     their state: count, left/right projectors, fira_norm, inner
  scale_by_adam_galore_torch      Adam as galore-torch computes it (eps before bias correction)
Projectors (jaxattn.optim.projectors)
  SVD, Randomized, DCT            exact SVD, randomized subspace iteration, SVD-free DCT
  sign_convention, dct_basis      the basis sign rule; DCT-II columns from indices
Sharding (jaxattn.optim.specs)
  state_partition_specs, state_spec   optimizer-state PartitionSpecs from the parameters'
8-bit states (jaxattn.optim.quantize)
  quantize_state                  any transform with block-wise 8-bit state leaves
  QuantizedArray, quantize, dequantize, dynamic_code_map
"""

from jaxattn.optim.galore import GaLoreState, fira, galore, scale_by_adam_galore_torch
from jaxattn.optim.projectors import DCT, SVD, Randomized, dct_basis, sign_convention
from jaxattn.optim.quantize import (
    QuantizedArray,
    dequantize,
    dynamic_code_map,
    quantize,
    quantize_state,
)
from jaxattn.optim.specs import state_partition_specs, state_spec

__all__ = [
    "galore",
    "fira",
    "GaLoreState",
    "scale_by_adam_galore_torch",
    "SVD",
    "Randomized",
    "DCT",
    "sign_convention",
    "dct_basis",
    "state_partition_specs",
    "state_spec",
    "quantize_state",
    "QuantizedArray",
    "quantize",
    "dequantize",
    "dynamic_code_map",
]
