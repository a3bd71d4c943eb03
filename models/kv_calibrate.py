"""KVQuant calibration: fit every layer's nuq codebooks on calibration tokens (PAPERS.md §5).

KVQuant's non-uniform datatype (``CacheConfig(format="kvquant", datatype="nuq")``) needs, per
layer, a codebook of 2^bits levels for its keys and one for its values, fitted offline on
activations normalised per quantization group. ``calibrate_kvquant`` gathers them through the
hook seam (DESIGN.md, Extension points 4 and 8):

1. one prefill of the calibration tokens through ``model.decode`` over empty KVQuant caches,
   with ``Capture("blocks.*.attn.k")`` / ``Capture("blocks.*.attn.v")``
   (``jaxattn.heads.decode_with_hooks``). Over a cache of pre-RoPE keys the layer leaves its
   new keys unrotated (``Context.keys_pre_rope``), so the ``attn.k`` point holds the keys
   BEFORE RoPE, which is what the cache quantizes; a prefill into an empty cache attends the
   new tokens in full precision, so every layer sees the full-precision residual stream;
2. the cache's own preprocessing: cast to the storage dtype, the dense-and-sparse split
   (``split_outliers``: each vector's ceil(outliers · H) largest entries removed), then
   ``normalize`` per group as ``PackedRows`` groups them: keys per channel over
   ``group_size`` consecutive tokens from position 0, values per token over ``group_size``
   consecutive channels;
3. ``fit_codebook`` (weighted 1-D k-means) on all of a layer's normalised keys, and on its
   values.

It returns one ``CacheConfig`` per layer, which ``DecoderLM.init_cache(cache=)`` and
``jaxattn.generate.generate(cache=)`` take as a tuple. Not implemented here: KVQuant's Fisher
sensitivity weights (every activation weighs the same: plain k-means), and per-channel outlier
thresholds (the cache picks outliers per vector online).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import heads
from jaxattn.cache import CacheConfig
from jaxattn.cache._kvquant import split_outliers
from jaxattn.ops.kv_quant import fit_codebook, normalize

__all__ = ["capture_pre_rope_kv", "normalized_kv", "calibrate_kvquant"]


@nnx.jit(static_argnums=(2, 3))
def _capture(model, tokens_BT, base: CacheConfig, dtype):
    b, t = tokens_BT.shape
    cache = model.init_cache(b, t, dtype, cache=base)
    hooks = (heads.Capture("blocks.*.attn.k"), heads.Capture("blocks.*.attn.v"))
    _, _, got = heads.decode_with_hooks(model, tokens_BT, cache, hooks)
    n = len(model.layers)
    return [(got[f"blocks.{i}.attn.k"], got[f"blocks.{i}.attn.v"]) for i in range(n)]


def capture_pre_rope_kv(model, tokens_BT, *, group_size: int = 32, dtype=None):
    """Each layer's keys before RoPE and its values on ``tokens_BT`` (one prefill).

    Args:
      model: a ``models.DecoderLM`` whose layers serve ``format="kvquant"`` (dense layouts).
      tokens_BT: int calibration tokens [B, T].
      group_size: the capture cache's group (any that divides its residual; no effect on the
        captured values).
      dtype: the capture cache's dtype (default the model's compute dtype).

    Returns:
      [(k_BTKH, v_BTKV)] per layer, in the layer's compute dtype.
    """
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    if tokens_BT.ndim != 2:
        raise ValueError(f"tokens_BT must be [batch, length], got shape {tokens_BT.shape}")
    dtype = jnp.dtype(model.config.dtype if dtype is None else dtype)
    base = CacheConfig(format="kvquant", group_size=group_size, residual=group_size)
    return _capture(model, tokens_BT, base, dtype.name)


def normalized_kv(k_BTKH, v_BTKV, *, group_size: int, outliers: float, dtype):
    """One layer's keys and values as the cache quantizes them, normalised per group.

    Args:
      k_BTKH: pre-RoPE keys [B, T, K, H] (T a multiple of ``group_size``); v_BTKV: values.
      group_size, outliers: the ``CacheConfig`` fields; dtype: the cache's storage dtype.

    Returns:
      (keys [B, T / g, g, K, H], values [B, T, K, V / g, g]) in [0, 1], fp32: each key group
      one channel over g tokens, each value group one token over g channels, the outliers
      zeroed before the group's min and max are taken (as ``KVQuantCache``).
    """
    g = group_size
    b, t, k, h = k_BTKH.shape
    v = v_BTKV.shape[-1]
    if t % g or v % g:
        raise ValueError(
            f"CacheConfig.group_size={g} must divide the calibration length {t} and the value "
            f"head dim {v}"
        )
    dense_k = split_outliers(k_BTKH.astype(dtype), math.ceil(outliers * h))[0]
    dense_v = split_outliers(v_BTKV.astype(dtype), math.ceil(outliers * v))[0]
    u_k = normalize(dense_k.reshape(b, t // g, g, k, h), 2)
    u_v = normalize(dense_v.reshape(*v_BTKV.shape[:3], v // g, g), -1)
    return u_k, u_v


def calibrate_kvquant(
    model,
    tokens_BT,
    *,
    bits: int = 4,
    group_size: int = 32,
    residual: int = 128,
    outliers: float = 0.01,
    fp_sinks: int = 1,
    scale_dtype: str = "float16",
    dtype=None,
    iters: int = 50,
) -> tuple[CacheConfig, ...]:
    """Per-layer KVQuant nuq cache configs with codebooks fitted on ``tokens_BT``.

    Args:
      model: a ``models.DecoderLM`` whose layers serve ``format="kvquant"``.
      tokens_BT: int calibration tokens [B, T], T a multiple of ``group_size``.
      bits, group_size, residual, outliers, fp_sinks, scale_dtype: the configs' fields (see
        ``CacheConfig``); the normalisation uses the same group size and outlier fraction.
      dtype: the storage dtype the caches will use (default the model's compute dtype):
        activations are cast to it before the outlier split, as the cache does.
      iters: ``fit_codebook``'s Lloyd iterations.

    Returns:
      One ``CacheConfig(format="kvquant", datatype="nuq", codebook=(key, value levels))`` per
      layer, for ``init_cache(cache=)`` / ``generate(cache=)``.

    Raises:
      ValueError: bad fields (named, from ``CacheConfig``), T not a multiple of
        ``group_size`` (naming ``tokens_BT``), or a layer that cannot serve "kvquant".
    """
    fields = dict(format="kvquant", bits=bits, group_size=group_size, residual=residual,
                  outliers=outliers, fp_sinks=fp_sinks, scale_dtype=scale_dtype)  # fmt: skip
    CacheConfig(**fields)  # the fields' own checks first
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    if tokens_BT.ndim != 2 or tokens_BT.shape[1] % group_size:
        raise ValueError(
            f"tokens_BT {tokens_BT.shape} must be [batch, length] with length a multiple of "
            f"group_size={group_size} (keys are normalised per group of tokens)"
        )
    dtype = jnp.dtype(model.config.dtype if dtype is None else dtype)
    configs = []
    for k_BTKH, v_BTKV in capture_pre_rope_kv(model, tokens_BT, group_size=group_size):
        u_k, u_v = normalized_kv(
            k_BTKH, v_BTKV, group_size=group_size, outliers=outliers, dtype=dtype
        )
        books = tuple(
            tuple(float(x) for x in jax.device_get(fit_codebook(u, bits, iters=iters)))
            for u in (u_k, u_v)
        )
        configs.append(CacheConfig(**fields, datatype="nuq", codebook=books))
    return tuple(configs)
