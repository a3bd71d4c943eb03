"""jaxattn.cache: fixed-size, jit-friendly caches that own the attention over themselves.

A cache is a storage format combined with a policy, named per layer by a ``CacheConfig``
(DESIGN.md, Extension point 6). Caches are pytrees of fixed-shape buffers; build one with a
layer's ``init_cache`` (or ``create``). The protocol layers and ``generate`` use:

* ``update_and_attend(q, new..., num_new_B=, mask=, **op_args) -> (o, cache)``: attend the new
  queries over the stored tokens and the new ones, store the new tokens, count them;
* ``lengths_B``: tokens seen per sequence (the next token's absolute position), and
  ``positions_BT(t)``: the positions of the next t tokens (what a layer rotates them by);
* ``key_positions_BC()``: the absolute position each slot holds (-1: empty), so ring buffers
  and eviction need no positional bookkeeping outside the cache;
* ``bytes_per_token()``: exact storage bytes of one token; ``check_room(n)``: can a sequence of
  n tokens be decoded; ``advance`` / ``with_lengths`` / ``write``: lower-level steps.

The attention runs in the storage dtype with fp32 accumulation (queries are cast, never the
cache) through ``jaxattn.dot_product_attention``, so ``implementation="auto"`` reaches the
Pallas decode kernels on TPU / GPU for full caches and one-token ring steps.

Capacity: a full cache holds ``capacity`` positions per sequence. Writing past it raises
ValueError before the write when it is known on the host (a static write longer than the
capacity, concrete lengths); under ``jit`` the write carries a ``checkify.debug_check``
(wrap the call in ``jax.experimental.checkify.checkify`` to get the error), and without it the
overflowing sequence's outputs are NaN from then on and nothing is clamped onto other slots.
A "sink_window" ring never overflows.

Formats
  KVCache       "dense": keys and values, K·H + K_v·V numbers per token (MHA / GQA / MQA / SQA)
  LatentCache   "latent": normalised latent and decoupled rope key, L + P numbers per token (MLA)
  LinearStateCache  a linear-attention layer's fixed-size recurrent state (kind "linear")
Quantized formats (CacheConfig.format, any policy; PAPERS.md §5)
  QuantizedKVCache      "kivi" on the dense layout: packed 2/3/4/8-bit keys (per channel) and
                        values (per token) with fp16 scales / zeros and a full-precision window;
                        "rotatekv": the same, of Hadamard-rotated keys and values
  QuantizedLatentCache  "kivi" on MLA's latent rows (per channel)
  MixedPrecisionKVCache "mikv" (MiKV): every token at low bits per token, the heavy hitters
                        (H2O's accumulated attention) and the recent window in full precision
  KVQuantCache          "kvquant" (KVQuant): pre-RoPE per-channel keys, per-token values,
                        fp outliers per vector in a side table, fp attention-sink tokens
  CSKVCache             "cskv" (CSKV, PAPERS.md §2, policy "full"): low-rank key / value
                        features of every token (optionally 2/4/8-bit per token) + the exact
                        keys and values of the last ``residual`` tokens
  GearCache             "gear" (GEAR): quantized backbone + per-block low-rank residual + sparse
                        outliers, a full-precision buffer compressed every n_b tokens
  PackedRows            one quantized tensor: codes, scales, zeros, window (its ``store``)
  dense_cache, latent_cache   the cache a CacheConfig names, for a dense / latent layout
  HistoryKVCache  a KVCache plus the last R tokens' pre-attention features (kind "cca")
Policies (CacheConfig.policy)
  "full"          every token, up to the capacity
  "sink_window"   the first ``sink`` and last ``window`` tokens in a ring of sink + window
                  slots: constant memory, equal to full attention under masks.SinkWindow
Config
  CacheConfig   format, policy, sink, window, storage dtype (frozen, JSON-able)
"""

from jaxattn.cache._config import CacheConfig
from jaxattn.cache._cskv import CSKVCache
from jaxattn.cache._dense import KVCache
from jaxattn.cache._gear import GearCache
from jaxattn.cache._history import HistoryKVCache
from jaxattn.cache._kvquant import KVQuantCache
from jaxattn.cache._latent import LatentCache
from jaxattn.cache._mixed import MixedPrecisionKVCache
from jaxattn.cache._packed import PackedRows
from jaxattn.cache._quantized import (
    QuantizedKVCache,
    QuantizedLatentCache,
    dense_cache,
    latent_cache,
)
from jaxattn.cache._state import LinearStateCache

__all__ = [
    "CacheConfig",
    "CSKVCache",
    "GearCache",
    "KVCache",
    "KVQuantCache",
    "LatentCache",
    "LinearStateCache",
    "MixedPrecisionKVCache",
    "PackedRows",
    "QuantizedKVCache",
    "QuantizedLatentCache",
    "dense_cache",
    "latent_cache",
    "HistoryKVCache",
]
