"""jaxattn.optim: optax GradientTransformations for low-rank training (PAPERS.md §8).

Gradient low-rank projection (jaxattn.optim.galore)
  galore, fira                    GaLore / Fira around any inner transform
  GaLoreState                     their state: count, left/right projectors, fira_norm, inner
  scale_by_adam_galore_torch      Adam as galore-torch computes it (eps before bias correction)
Projectors (jaxattn.optim.projectors)
  SVD, Randomized, DCT            exact SVD, randomized subspace iteration, SVD-free DCT
  sign_convention, dct_basis      the basis sign rule; DCT-II columns from indices
Weight-normalised and factorised weights
  gradnormlorp, weight_norm_split, weight_norm_merge     GradNormLoRP (jaxattn.optim.weightnorm)
  lowrank_refactor, balance_factors, RefactorState       W = BA refactorisation + momentum reset
Low-rank weight parameterisations (pretraining from scratch)
  parameterize, form_param_count  lowrank / sltrain / sst kernels by path (optim.parameterize)
  sst, SSTState, sample_vectors   Sparse Spectral Training's sampled updates (jaxattn.optim.sst)
  resvd                           SST's periodic re-SVD of U·diag(s)·Vᵀ (no [m, n] formed)
  sampling_probabilities          SST's p_i = ½ (1/k + s_i / Σ s) (uniform share configurable)
Sharding (jaxattn.optim.specs)
  state_partition_specs, state_spec   optimizer-state PartitionSpecs from the parameters'
8-bit states (jaxattn.optim.quantized)
  quantize_state                  any transform with block-wise 8-bit state leaves
  QuantizedArray, quantize, dequantize, dynamic_code_map
"""

from jaxattn.optim.galore import GaLoreState, fira, galore, scale_by_adam_galore_torch
from jaxattn.optim.parameterize import DEFAULT_PATHS, form_param_count, parameterize
from jaxattn.optim.projectors import DCT, SVD, Randomized, dct_basis, sign_convention
from jaxattn.optim.quantized import (
    QuantizedArray,
    dequantize,
    dynamic_code_map,
    quantize,
    quantize_state,
)
from jaxattn.optim.refactor import RefactorState, balance_factors, lowrank_refactor
from jaxattn.optim.specs import state_partition_specs, state_spec
from jaxattn.optim.sst import SSTState, resvd, sample_vectors, sampling_probabilities, sst
from jaxattn.optim.weightnorm import gradnormlorp, weight_norm_merge, weight_norm_split

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
    "gradnormlorp",
    "weight_norm_split",
    "weight_norm_merge",
    "lowrank_refactor",
    "balance_factors",
    "RefactorState",
    "parameterize",
    "form_param_count",
    "DEFAULT_PATHS",
    "sst",
    "SSTState",
    "sample_vectors",
    "sampling_probabilities",
    "resvd",
    "state_partition_specs",
    "state_spec",
    "quantize_state",
    "QuantizedArray",
    "quantize",
    "dequantize",
    "dynamic_code_map",
]
