"""Rotary position embeddings (RoPE, Su et al. 2021), numerically matching Hugging Face.

A pair of dims (a, b) of a query or key at integer position m is rotated by the angle
``m * inv_freq[i]``: ``(a, b) -> (a cos - b sin, b cos + a sin)``, with
``inv_freq[i] = theta ** (-2i / P)`` for ``i < P / 2`` (P = ``rotary_dim``) before scaling.
Dims past ``rotary_dim`` pass through unchanged (partial rotary, GPT-NeoX / Phi style).
The result of ``<rope(q, m), rope(k, n)>`` depends only on ``m - n``.

Layouts, i.e. which dims form pair i (HF code that each one matches):

* ``"split_half"``: (i, i + P/2), output in place (HF Llama ``rotate_half``; DeepSeek-V3
  with ``rope_interleave=False``; GPT-NeoX).
* ``"interleaved"``: (2i, 2i+1), output in place (GPT-J, Meta's original Llama, HF
  DeepSeek-V2's complex ``apply_rotary_emb``).
* ``"interleaved_to_split_half"``: the MLA layout of HF DeepSeek-V3 / Mistral4 with
  ``rope_interleave=True`` (their default): the *input* pairs are (2i, 2i+1), as DeepSeek's
  projection weights are laid out, and the *output* is written de-interleaved: rotated even
  dims first, then rotated odd dims (``apply_rotary_pos_emb_interleave``). q_pe and k_pe go
  through the same permutation, so q.k is that of ``"interleaved"``, but the tensor (and a
  cached k_pe) differs from it by the permutation; use it to reproduce HF activations.

Scaling (HF ``rope_parameters["rope_type"]``): ``LinearScaling`` ("linear"),
``DynamicNTKScaling`` ("dynamic", depends on the largest position seen), ``NTKScaling``
(static NTK-aware theta scaling; HF has no such type, so ``rope_config_to_hf`` folds it into
``rope_theta``), ``Llama3Scaling`` ("llama3"), ``YarnScaling`` ("yarn", DeepSeek's mscale
variant included) and ``LongRopeScaling`` ("longrope"). YaRN/LongRoPE multiply cos and sin
by an attention factor; DeepSeek-V2/V3 additionally scale the softmax, see
``mla_softmax_scale_factor``.

Shape suffixes: P = rotary_dim (DESIGN.md's rope dims), P2 = P // 2 (one per rotated pair).

For MLA, call ``apply_rope`` on q_pe [B, T, N, qk_rope_head_dim] and k_pe [B, T, 1, ...] with
``head_dim = qk_rope_head_dim`` (HF DeepSeek sets ``config.head_dim`` to it).

This module is the public surface: ``RopeConfig``, the scaling dataclasses and their frequency
math live in ``_rope_scaling``, the HF config conversion in ``_rope_hf``; import them from here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops._rope_hf import rope_config_from_hf, rope_config_to_hf
from jaxattn.ops._rope_scaling import (
    _F32,
    LAYOUTS,
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    NTKScaling,
    RopeConfig,
    RopeScaling,
    YarnScaling,
    _dynamic_inv_freq,
    _llama3_inv_freq,
    _longrope_inv_freq,
    _original_and_factor,
    _pow32,
    _rdiv,
    _resolved_rotary_dim,
    _yarn_inv_freq,
    _yarn_mscale,
)

__all__ = [
    "LAYOUTS",
    "RopeConfig",
    "RopeScaling",
    "LinearScaling",
    "DynamicNTKScaling",
    "NTKScaling",
    "Llama3Scaling",
    "YarnScaling",
    "LongRopeScaling",
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rope",
    "mla_softmax_scale_factor",
    "rope_config_from_hf",
    "rope_config_to_hf",
]


def rope_frequencies(
    config: RopeConfig, head_dim: int, seq_len: int | jax.Array | None = None
) -> tuple[jax.Array, float]:
    """Inverse frequencies and the cos/sin attention factor, as HF's ``ROPE_INIT_FUNCTIONS``.

    Computed in float32 with HF's operation order, so they agree with transformers to an ulp.

    Args:
      config: the rope config.
      head_dim: the size H of the heads rope is applied to (for MLA, ``qk_rope_head_dim``).
      seq_len: largest position + 1 (may be traced); only dynamic NTK and longrope use it.
        None means the unscaled / short setting, as HF at initialisation.

    Returns:
      ``(inv_freq_P2, attention_factor)``: float32 [rotary_dim // 2] and a Python float
      (1.0 unless yarn / longrope).
    """
    dim = _resolved_rotary_dim(config, head_dim)
    s, theta, attention = config.scaling, config.theta, 1.0
    if isinstance(s, (DynamicNTKScaling, NTKScaling)) and dim <= 2:
        raise ValueError(f"rotary_dim must be > 2 for {type(s).__name__}, got {dim}")
    if isinstance(s, NTKScaling):
        theta = theta * s.factor ** (dim / (dim - 2))
    exps_P2 = np.arange(0, dim, 2, dtype=_F32) / _F32(dim)
    inv_freq_P2 = _rdiv(1, _pow32(theta, exps_P2))
    if isinstance(s, LinearScaling):
        inv_freq_P2 = inv_freq_P2 / _F32(s.factor)
    elif isinstance(s, Llama3Scaling):
        inv_freq_P2 = _llama3_inv_freq(s, inv_freq_P2)
    elif isinstance(s, YarnScaling):
        inv_freq_P2, attention = _yarn_inv_freq(config, s, exps_P2, dim)
    elif isinstance(s, DynamicNTKScaling) and seq_len is not None:
        inv_freq_P2 = _dynamic_inv_freq(config, s, exps_P2, dim, seq_len, inv_freq_P2)
    elif isinstance(s, LongRopeScaling):
        inv_freq_P2, attention = _longrope_inv_freq(config, s, theta, exps_P2, dim, seq_len)
    return jnp.asarray(inv_freq_P2, jnp.float32), float(attention)


def rope_cos_sin(
    positions_BT: jax.Array, config: RopeConfig, head_dim: int
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, one per rotated pair, times the attention factor.

    Args:
      positions_BT: integer positions [B, T]; dynamic NTK / longrope use max + 1 as seq_len.
      config: the rope config.
      head_dim: the head size H.

    Returns:
      ``(cos_BTP2, sin_BTP2)`` float32 [B, T, rotary_dim // 2] (one angle per pair).
    """
    positions_BT = _checked_positions(positions_BT)
    _resolved_rotary_dim(config, head_dim)
    return _rope_cos_sin_jit(positions_BT, config, head_dim)


def _checked_positions(positions_BT: jax.Array) -> jax.Array:
    positions_BT = jnp.asarray(positions_BT)
    if positions_BT.ndim != 2 or not jnp.issubdtype(positions_BT.dtype, jnp.integer):
        raise ValueError(
            f"positions_BT must be an integer [B, T] array, got {positions_BT.dtype}"
            f"{list(positions_BT.shape)}"
        )
    return positions_BT


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rope_cos_sin_jit(positions_BT: jax.Array, config: RopeConfig, head_dim: int):
    seq_len = None
    if isinstance(config.scaling, (DynamicNTKScaling, LongRopeScaling)):
        seq_len = jnp.max(positions_BT) + 1
    inv_freq_P2, attention = rope_frequencies(config, head_dim, seq_len)
    angles_BTP2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_P2
    return jnp.cos(angles_BTP2) * attention, jnp.sin(angles_BTP2) * attention


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, config: RopeConfig) -> jax.Array:
    """Rotate the first ``rotary_dim`` dims of each head of x at integer positions.

    Args:
      x_BTNH: queries or keys [B, T, N, H], any float dtype.
      positions_BT: integer positions [B, T] of x's tokens.
      config: the rope config (layout, scaling, rotary_dim).

    Returns:
      [B, T, N, H], x's dtype; dims past rotary_dim unchanged; the math runs in float32.
    """
    x_BTNH, positions_BT = jnp.asarray(x_BTNH), _checked_positions(positions_BT)
    if x_BTNH.ndim != 4:
        raise ValueError(f"x_BTNH must have rank 4 [B, T, N, H], got shape {x_BTNH.shape}")
    if positions_BT.shape != x_BTNH.shape[:2]:
        raise ValueError(
            f"positions_BT must have shape [B, T] = {x_BTNH.shape[:2]}, got {positions_BT.shape}"
        )
    _resolved_rotary_dim(config, x_BTNH.shape[-1])
    return _apply_rope_jit(x_BTNH, positions_BT, config)


@functools.partial(jax.jit, static_argnums=2)
def _apply_rope_jit(x_BTNH: jax.Array, positions_BT: jax.Array, config: RopeConfig) -> jax.Array:
    # One compiled program per shape and config: eager op-by-op dispatch is much slower.
    head_dim = x_BTNH.shape[-1]
    dim = _resolved_rotary_dim(config, head_dim)
    cos_BTP2, sin_BTP2 = _rope_cos_sin_jit(positions_BT, config, head_dim)
    cos_BT1P2, sin_BT1P2 = cos_BTP2[:, :, None, :], sin_BTP2[:, :, None, :]
    x_BTNH_f32 = x_BTNH.astype(jnp.float32)
    rot_BTNP, pass_BTNH = x_BTNH_f32[..., :dim], x_BTNH_f32[..., dim:]
    if config.layout == "split_half":
        a_BTNP2, b_BTNP2 = rot_BTNP[..., : dim // 2], rot_BTNP[..., dim // 2 :]
    else:
        a_BTNP2, b_BTNP2 = rot_BTNP[..., 0::2], rot_BTNP[..., 1::2]
    ra_BTNP2 = a_BTNP2 * cos_BT1P2 - b_BTNP2 * sin_BT1P2
    rb_BTNP2 = b_BTNP2 * cos_BT1P2 + a_BTNP2 * sin_BT1P2
    if config.layout == "interleaved":
        rot_BTNP = jnp.stack([ra_BTNP2, rb_BTNP2], axis=-1).reshape(rot_BTNP.shape)
    else:  # split_half, and interleaved_to_split_half writes its output de-interleaved
        rot_BTNP = jnp.concatenate([ra_BTNP2, rb_BTNP2], axis=-1)
    return jnp.concatenate([rot_BTNP, pass_BTNH], axis=-1).astype(x_BTNH.dtype)


def mla_softmax_scale_factor(config: RopeConfig) -> float:
    """Factor HF DeepSeek-V2/V3 multiply the softmax scale by (``yarn_apply_mscale``).

    With yarn and a truthy ``mscale_all_dim``, the scale ``qk_head_dim ** -0.5`` is multiplied
    by ``mscale(factor, mscale_all_dim) ** 2``; otherwise 1.0. This is separate from the cos/sin
    attention factor that ``apply_rope`` already applies.
    """
    s = config.scaling
    if not isinstance(s, YarnScaling) or not s.mscale_all_dim:
        return 1.0
    _, factor = _original_and_factor(config, s)
    return _yarn_mscale(factor, s.mscale_all_dim) ** 2
