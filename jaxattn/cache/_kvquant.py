"""KVQuant: pre-RoPE per-channel keys, dense-and-sparse outliers, fp attention sinks (PAPERS.md §5).

``KVQuantCache`` (``CacheConfig(format="kvquant")``, dense layout, policy "full") stores, per
sequence (Hooper et al. 2024, "KVQuant"):

* keys BEFORE RoPE, quantized per channel (KIVI's ``PackedRows`` "channel" axis: a scale and
  zero per channel over ``group_size`` tokens), and values per token. Pre-RoPE keys keep their
  outlier channels in fixed channels (RoPE mixes each channel pair with a position-dependent
  rotation, so after it the magnitude of a channel varies along the tokens and per-channel
  ranges widen: the paper's motivation, tested). The layer leaves the new keys unrotated
  (``Context.keys_pre_rope``, set by ``AttentionLayer.decode`` from ``pre_rope``) and passes
  its ``rope``; the cache rotates every key it reads at its position, after dequantization.
* dense-and-sparse: per token vector (one head's row of H numbers) the O = ceil(outliers · H)
  entries of largest magnitude are kept in the storage dtype in a side table (values and
  their channel indices, uint8 / int16), zeroed in the row that is quantized, and written back
  over the dequantized row when it is read: outliers come back exactly (tested).
* the first S = ``fp_sinks`` tokens (the attention sink) in the storage dtype: their rows are
  read from the sink table instead of their codes.

Attention is ``_QuantizedMixin``'s (block-wise dequantization, the window, the new tokens in
full precision, one softmax); ``key_fn`` / ``value_fn`` restore outliers and sinks and apply
RoPE to each block as it is read.

Datatypes: ``datatype="uniform"`` (default) uses KIVI's integer grid; ``"nuq"`` KVQuant's nuqX:
each code indexes a per-layer codebook (``CacheConfig.codebook``, keys' and values' levels in
[0, 1] of each group's range), fitted beforehand on calibration activations normalised per
group by weighted 1-D k-means (``jaxattn.ops.kv_quant.normalize`` / ``fit_codebook``; the
paper's sensitivity weights are the Fisher information, optional: uniform weights without).

The calibration pass that fits every layer's codebooks of a model through the hooks is
``models.kv_calibrate.calibrate_kvquant``. Not implemented here: per-channel key outlier
thresholds calibrated offline (outliers are chosen per token vector online) and excluding the
sink tokens from the quantization ranges.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import _num_new, positions_BT, write_rows
from jaxattn.cache._dense import _policy
from jaxattn.cache._packed import PackedRows
from jaxattn.cache._quantized import QuantizedKVCache, _check_sizes, _QuantizedMixin, _rows
from jaxattn.ops.rope import apply_rope

__all__ = ["KVQuantCache", "split_outliers", "restore_outliers"]


def _index_dtype(dim: int):
    return jnp.uint8 if dim <= 256 else jnp.int16


def split_outliers(x_BTKH: jax.Array, count: int):
    """Dense-and-sparse split of each vector (last axis): the ``count`` largest magnitudes.

    Returns:
      (dense [B, T, K, H] with the outliers zeroed, values [B, T, K, O] in x's dtype, channel
      indices [B, T, K, O] uint8 (H <= 256) or int16).
    """
    h = x_BTKH.shape[-1]
    idx_dt = _index_dtype(h)
    if count == 0:
        empty = jnp.zeros((*x_BTKH.shape[:-1], 0), x_BTKH.dtype)
        return x_BTKH, empty, empty.astype(idx_dt)
    _, idx = jax.lax.top_k(jnp.abs(x_BTKH.astype(jnp.float32)), count)
    val = jnp.take_along_axis(x_BTKH, idx, axis=-1)
    hit = jnp.any(idx[..., None] == jnp.arange(h), axis=-2)
    return jnp.where(hit, jnp.zeros_like(x_BTKH), x_BTKH), val, idx.astype(idx_dt)


def restore_outliers(rows_BSKH: jax.Array, val_BSKO: jax.Array, idx_BSKO: jax.Array):
    """Write the side table's values back over their channels of each row (split's inverse)."""
    if val_BSKO.shape[-1] == 0:
        return rows_BSKH
    hit = idx_BSKO.astype(jnp.int32)[..., None] == jnp.arange(rows_BSKH.shape[-1])  # [..., O, H]
    new = jnp.sum(jnp.where(hit, val_BSKO[..., None].astype(rows_BSKH.dtype), 0), axis=-2)
    return jnp.where(jnp.any(hit, axis=-2), new, rows_BSKH)


@struct.dataclass
class KVQuantCache(_QuantizedMixin):
    """A dense K/V cache in KVQuant's format (see the module).

    Attributes:
      k: pre-RoPE keys [B, C, K, H] as ``PackedRows`` (per channel), outliers zeroed.
      v: values [B, C, K_v, V] as ``PackedRows`` (per token), outliers zeroed.
      k_val_BCKO, k_idx_BCKO: each slot's key outliers (values, channel indices).
      v_val_BCKO, v_idx_BCKO: each slot's value outliers.
      sink_k_BSKH, sink_v_BSKV: the first S tokens' pre-RoPE keys and values.
      lengths_B: int32 [B] tokens seen per sequence.
    """

    k: PackedRows
    v: PackedRows
    k_val_BCKO: jax.Array
    k_idx_BCKO: jax.Array
    v_val_BCKO: jax.Array
    v_idx_BCKO: jax.Array
    sink_k_BSKH: jax.Array
    sink_v_BSKV: jax.Array
    lengths_B: jax.Array
    sink: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=0)

    pre_rope = True  # the layer hands over unrotated keys and its rope (Context.keys_pre_rope)

    @classmethod
    def create(
        cls, *, batch, capacity, num_kv_heads, head_dim, v_head_dim=None, num_v_heads=None,
        dtype=jnp.bfloat16, config,
    ) -> KVQuantCache:  # fmt: skip
        """An empty cache (arguments as ``KVCache.create``; ``config.format == "kvquant"``).

        Raises:
          ValueError: ``config.group_size`` does not divide the value head dim, or a bad size.
        """
        _check_sizes(batch=batch, capacity=capacity, num_kv_heads=num_kv_heads, head_dim=head_dim)
        _, _, dtype = _policy(config, "kvquant", dtype)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
        common = dict(batch=batch, capacity=capacity, dtype=dtype, sink=0, window=0)
        kb, vb = config.codebook or (None, None)  # "nuq": the calibrated levels
        k = _rows(
            config,
            heads=num_kv_heads,
            dim=head_dim,
            axis="channel",
            what="key",
            codebook=kb,
            **common,
        )
        v = _rows(config, heads=num_v_heads, dim=v_head_dim, axis="token", what="value",
                  codebook=vb, **common)  # fmt: skip
        c = k.codes_BCKW.shape[1]
        s = min(config.fp_sinks, c)

        def table(heads, dim):
            o = math.ceil(config.outliers * dim)
            return (
                jnp.zeros((batch, c, heads, o), dtype),
                jnp.zeros((batch, c, heads, o), _index_dtype(dim)),
            )

        k_val, k_idx = table(num_kv_heads, head_dim)
        v_val, v_idx = table(num_v_heads, v_head_dim)
        return cls(
            k=k, v=v, k_val_BCKO=k_val, k_idx_BCKO=k_idx, v_val_BCKO=v_val, v_idx_BCKO=v_idx,
            sink_k_BSKH=jnp.zeros((batch, s, num_kv_heads, head_dim), dtype),
            sink_v_BSKV=jnp.zeros((batch, s, num_v_heads, v_head_dim), dtype),
            lengths_B=jnp.zeros((batch,), jnp.int32),
        )  # fmt: skip

    def _rows(self):
        return self.k, self.v

    _check_new = QuantizedKVCache._check_new

    @property
    def fp_sinks(self) -> int:
        """S, leading tokens kept in full precision."""
        return self.sink_k_BSKH.shape[1]

    def outlier_bytes(self) -> int:
        """Bytes of one slot's outlier tables (key and value values and indices)."""
        return sum(
            math.prod(x.shape[2:]) * x.dtype.itemsize
            for x in (self.k_val_BCKO, self.k_idx_BCKO, self.v_val_BCKO, self.v_idx_BCKO)
        )

    def sink_bytes(self) -> int:
        """Bytes of one sequence's sink table."""
        return sum(
            math.prod(x.shape[1:]) * x.dtype.itemsize for x in (self.sink_k_BSKH, self.sink_v_BSKV)
        )

    def bytes_per_token(self, context: int | None = None) -> float:
        """Exact storage bytes per token of one sequence.

        Args:
          context: None: a quantized token's bytes (codes, its share of scales and zeros, and
            its outlier tables), the limit at long contexts. An int: every buffer of a cache
            built for ``context`` positions (rows rounded up to a group, windows, outlier
            tables of every slot, the sink table, and the sequence's 1/B share of the nuq
            codebooks, one buffer for the whole batch) over ``context``: B times it, times
            ``context``, is every buffer of the cache but ``lengths_B``.
        """
        if context is None:
            return super().bytes_per_token() + self.outlier_bytes()
        slots = -(-context // self.k.group) * self.k.group
        extra = slots * self.outlier_bytes() + self.sink_bytes()
        return super().bytes_per_token(context) + extra / context

    def _restore(self, which, rope):
        """``key_fn`` / ``value_fn`` for ``_attend_and_store``: outliers, sinks, then RoPE."""
        val, idx, sink = (
            (self.k_val_BCKO, self.k_idx_BCKO, self.sink_k_BSKH)
            if which == "k"
            else (self.v_val_BCKO, self.v_idx_BCKO, self.sink_v_BSKV)
        )
        s = sink.shape[1]

        def fn(rows, slots_Bs, kpos_Bs):
            bi = jnp.arange(rows.shape[0])[:, None]
            rows = restore_outliers(rows, val[bi, slots_Bs], idx[bi, slots_Bs])
            if s:
                is_sink = ((kpos_Bs >= 0) & (kpos_Bs < s))[:, :, None, None]
                rows = jnp.where(is_sink, sink[bi, jnp.clip(kpos_Bs, 0, s - 1)], rows)
            if rope is not None:
                rows = apply_rope(rows, jnp.maximum(kpos_Bs, 0), rope).astype(rows.dtype)
            return rows

        return fn

    def _store_tables(self, k_split, v_split, k_BTKH, v_BTKV, num_B):
        n_B = self.lengths_B
        w = lambda buf, new: write_rows(buf, new, n_B, num_B)  # noqa: E731
        return dict(
            k_val_BCKO=w(self.k_val_BCKO, k_split[1]), k_idx_BCKO=w(self.k_idx_BCKO, k_split[2]),
            v_val_BCKO=w(self.v_val_BCKO, v_split[1]), v_idx_BCKO=w(self.v_idx_BCKO, v_split[2]),
            sink_k_BSKH=w(self.sink_k_BSKH, k_BTKH), sink_v_BSKV=w(self.sink_v_BSKV, v_BTKV),
        )  # fmt: skip

    def _split(self, k_BTKH, v_BTKV):
        dt = self.k.dtype
        k_BTKH, v_BTKV = k_BTKH.astype(dt), v_BTKV.astype(dt)
        ks = split_outliers(k_BTKH, self.k_val_BCKO.shape[-1])
        vs = split_outliers(v_BTKV, self.v_val_BCKO.shape[-1])
        return k_BTKH, v_BTKV, ks, vs

    def write(self, k_BTKH, v_BTKV, num_new_B=None) -> KVQuantCache:
        """Store T new pre-RoPE keys / values after ``lengths_B``; lengths unchanged."""
        self._check_new(k_BTKH, v_BTKV)
        num_B = _num_new(num_new_B, k_BTKH.shape[1], k_BTKH.shape[0])
        k_BTKH, v_BTKV, ks, vs = self._split(k_BTKH, v_BTKV)
        n_B = self.lengths_B
        return self.replace(
            k=self.k.store(n_B, ks[0], num_B), v=self.v.store(n_B, vs[0], num_B),
            **self._store_tables(ks, vs, k_BTKH, v_BTKV, num_B),
        )  # fmt: skip

    def update_and_attend(
        self, q_BTNH, k_BTKH, v_BTKV, *, num_new_B=None, mask=None, rope=None, **op_kwargs
    ) -> tuple[jax.Array, KVQuantCache]:
        """As ``KVCache.update_and_attend``, with PRE-RoPE new keys.

        Args:
          q_BTNH: queries, already rotated at their positions.
          k_BTKH: the new tokens' keys before RoPE; v_BTKV: their values.
          rope: the layer's ``RopeConfig`` (None: keys are never rotated).
          num_new_B, mask, op_kwargs: as ``KVCache.update_and_attend``.
        """
        self._check_new(k_BTKH, v_BTKV)
        b, t = q_BTNH.shape[:2]
        num_B = _num_new(num_new_B, t, b)
        k_BTKH, v_BTKV, ks, vs = self._split(k_BTKH, v_BTKV)
        k_att = k_BTKH
        if rope is not None:
            k_att = apply_rope(k_BTKH, positions_BT(self.lengths_B, t), rope).astype(k_BTKH.dtype)
        o, (k, v) = self._attend_and_store(
            q_BTNH, (ks[0], vs[0]), num_new_B, mask=mask, key_fn=self._restore("k", rope),
            value_fn=self._restore("v", None), attend_new=(k_att, v_BTKV), **op_kwargs,
        )  # fmt: skip
        tables = self._store_tables(ks, vs, k_BTKH, v_BTKV, num_B)
        return o, self.replace(k=k, v=v, **tables).advance(num_B)
