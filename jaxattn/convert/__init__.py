"""jaxattn.convert: architecture conversions on layer parameters (DESIGN.md Extension point 8).

Pure functions ``(layer_config, layer_params, stats) -> (config, params, info)`` on one layer:
``layer_params`` is a nested dict of float64 arrays read through ``Linear.effective_kernel``,
``stats`` calibration statistics of the layer input, ``info`` the step's measured error.
``models.convert`` rebuilds whole models from them and runs the calibration passes.

Calibration statistics
  Moments, input_moments, covariance          Σ x xᵀ, Σ x, count of a layer input; E[yᵀy] of x W + b
  LatentNormStats, latent_norm_stats          sums that fit a latent RMSNorm scale
Parameters
  layer_params, load_layer_params             a layer's arrays (adapters folded in); write them
TransMLA (GQA -> MLA), ``jaxattn.convert.transmla``
  gqa_to_mla                                  exact: P = K·H rope key in blocks, L = K·V
  decouple_rope                               RoRoPE + FreqFold: RoPE on a P'-dim key only
  compress_latent                             PCA of the latent to kv_lora_rank (KV balanced)
  fit_latent_norm                             DeepSeek's latent RMSNorm, scale fitted
KV-head compression (MHA -> GQA), ``jaxattn.convert.kv_heads``
  merge_kv_heads                              PCA-merged kv heads, RoPE pairs mixed per frequency
  mean_pool_kv_heads                          mean-pooled kv heads (GQA's init; "kdgqa" / "dgqa")
CSKV (PAPERS.md §2), ``jaxattn.convert.cskv`` (K/V channel shrinking, bi-branch cache)
  cskv_init                                   K, V ≈ x A B: Eckart–Young optimum of E‖xW − xAB‖²
  cskv_compress_features                      the old branch's features, RTN-quantized per token
  cskv_attend                                 causal attention: exact window + absorbed features
  cskv_reconstruction_loss, cskv_train        layer-wise attention-output loss; Adam on factors
  cskv_bytes_per_token                        cache bytes per token, saving vs the full K/V cache
Weight compression (PAPERS.md §9), on matrices [I, O] (``Linear.as_matrix``)
  rtn_quantize                                RTN b-bit (2-8), per column / group, sym / asym
  svd_compensation, lorc                      ZeroQuant-V2 LoRC: Q(W) + top-r SVD of W − Q(W)
  eora                                        EoRA: compensation in the input eigenspace
  welore_ranks, welore                        WeLore: ranks from the σ decay, LRC / N-LRC split
  nuclear_subgradient                         TRP: U Vᵀ ∈ ∂‖W‖_* (λ U Vᵀ added to the gradient)
  energy_rank, trp_truncate                   TRP: T(W) the rank-k SVD, least k keeping Σσ² share e
  feature_lowrank                             CTR framework / AFM: PCA of the output features,
                                              x (W U_r) U_rᵀ + b' (≤ weight SVD's error)
  lord, lord_rank, lord_max_rank              LoRD: rank-k SVD factors A B, k = ⌊(1 − ρ) min(m, n)⌋;
                                              saves parameters iff k < m n / (m + n)
  lord_linear                                 LoRD on a Linear: factors into its ``lowrank`` form
  ordered_dropout_forward                     Maestro: x u_{:b} v_{:b}, a prefix of Σ u_i v_iᵀ
  sample_keep_rank, maestro_objective         Maestro: b ~ U[1, K]; loss at b or its mean over b
  maestro_train, maestro_truncate             Maestro: GD with ordered dropout (prefixes = PCA /
                                              SVD on linear tasks); keep the first b components
  nm_mask, nm_project                         DSFormer: top-N magnitudes of each M-group (N:M)
  ste_nm                                      DSFormer: straight-through P(S) (gradient to S)
  dsformer_params, dsformer_fit               DSFormer: W ≈ D P(S), D dense, S N:M; STE fit
MoDeGPT, ``jaxattn.convert.modegpt`` (module outputs on calibration data, per module type)
  modegpt_mlp                                 Type I, Nyström: ridge-leverage intermediate dims,
                                              W_D' = (SᵀCS)⁺ SᵀC W_D
  modegpt_qk                                  Type II, CR: head dims by ‖C_q^½ e_i‖ ‖C_k^½ e_i‖
  modegpt_vo                                  Type III, SVD of C^½ W_v W_o per head (Eckart–Young)
PELA, ``jaxattn.convert.pela`` (stack of linear layers; teacher frozen)
  pela_init                                   truncated-SVD factors A_l B_l of each W_l
  pela_loss, pela_train                       L_task + α Σ‖h_t − h_s‖² + β Σ‖W − A B‖²_F; Adam
SliceGPT, ``jaxattn.convert.slicegpt`` (model level: ``models.convert.slicegpt``)
  pca_rotation                                Q [D, D']: PCA of the normalised stream
  rotate_reader, rotate_writer                Qᵀ diag(γ) W_in; W_out Q, b_out Q
"""

from jaxattn.convert._params import layer_params, load_layer_params
from jaxattn.convert._stats import (
    LatentNormStats,
    Moments,
    covariance,
    input_moments,
    latent_norm_stats,
)
from jaxattn.convert.compensation import eora, lorc, svd_compensation
from jaxattn.convert.cskv import (
    cskv_attend,
    cskv_bytes_per_token,
    cskv_compress_features,
    cskv_init,
    cskv_reconstruction_loss,
    cskv_train,
)
from jaxattn.convert.dsformer import dsformer_fit, dsformer_params, nm_mask, nm_project, ste_nm
from jaxattn.convert.feature import feature_lowrank
from jaxattn.convert.kv_heads import merge_kv_heads
from jaxattn.convert.lord import lord, lord_linear, lord_max_rank, lord_rank
from jaxattn.convert.maestro import (
    maestro_objective,
    maestro_train,
    maestro_truncate,
    ordered_dropout_forward,
    sample_keep_rank,
)
from jaxattn.convert.mean_pool import mean_pool_kv_heads
from jaxattn.convert.modegpt import modegpt_mlp, modegpt_qk, modegpt_vo
from jaxattn.convert.pela import pela_init, pela_loss, pela_train
from jaxattn.convert.rtn import rtn_quantize
from jaxattn.convert.slicegpt import pca_rotation, rotate_reader, rotate_writer
from jaxattn.convert.transmla import compress_latent, decouple_rope, fit_latent_norm, gqa_to_mla
from jaxattn.convert.trp import energy_rank, nuclear_subgradient, trp_truncate
from jaxattn.convert.welore import welore, welore_ranks

__all__ = [
    "Moments",
    "input_moments",
    "covariance",
    "LatentNormStats",
    "latent_norm_stats",
    "layer_params",
    "load_layer_params",
    "gqa_to_mla",
    "decouple_rope",
    "compress_latent",
    "fit_latent_norm",
    "merge_kv_heads",
    "mean_pool_kv_heads",
    "rtn_quantize",
    "svd_compensation",
    "lorc",
    "eora",
    "pca_rotation",
    "rotate_reader",
    "rotate_writer",
    "welore_ranks",
    "welore",
    "nuclear_subgradient",
    "energy_rank",
    "trp_truncate",
    "feature_lowrank",
    "lord",
    "lord_rank",
    "lord_max_rank",
    "lord_linear",
    "ordered_dropout_forward",
    "sample_keep_rank",
    "maestro_objective",
    "maestro_train",
    "maestro_truncate",
    "nm_mask",
    "nm_project",
    "ste_nm",
    "dsformer_params",
    "dsformer_fit",
    "modegpt_mlp",
    "modegpt_qk",
    "modegpt_vo",
    "cskv_init",
    "cskv_compress_features",
    "cskv_attend",
    "cskv_reconstruction_loss",
    "cskv_train",
    "cskv_bytes_per_token",
    "pela_init",
    "pela_loss",
    "pela_train",
]
