"""Quantized caches: the dense and latent layouts stored as packed integers (PAPERS.md §5).

``QuantizedKVCache`` keeps keys and values as two ``PackedRows`` (KIVI: keys per channel,
values per token, each with a full-precision window of the last R tokens); ``QuantizedLatentCache``
keeps MLA's row ``[c | k_rope]`` (the one key and value of absorbed MLA) as one ``PackedRows``
quantized per channel. Both combine with the policies of ``jaxattn.cache`` (the quantized slots
follow the policy's slot map; a ring evicts whole groups) and speak the cache protocol.

Attention (``update_and_attend``), for T new queries after n stored tokens:

1. the stored tokens, through ``jaxattn.ops.attention_decode.decode_over_blocks`` (the
   "decode" implementation's split-S online softmax): a loop over blocks of quantized slots,
   each dequantized as it is read (the full-precision cache is never materialised), holding
   the positions below m = min(Q_k(n), Q_v(n)) where keys and values are both quantized, then
   one block for the positions m .. n - 1 (each key and value from its window, or its
   quantized slot when that tensor already quantized it), all by explicit key positions;
2. the new tokens among themselves in full precision (``dot_product_attention`` with the
   layer's implementation), merged with 1 by their log-sum-exps;
3. then the new tokens are stored (``PackedRows.store``): tokens are quantized after the step
   that first sees them, as in KIVI's decode (attend with the window, then quantize).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import _num_new, _SlotsMixin, check_room, key_positions, positions_BT
from jaxattn.cache._config import LAYOUT_FORMATS
from jaxattn.cache._dense import KVCache, _policy
from jaxattn.cache._latent import LatentCache
from jaxattn.cache._packed import PackedRows
from jaxattn.masks import SinkWindow
from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.attention_decode import DecodeBlockSizes, decode_over_blocks
from jaxattn.ops.kv_quant import hadamard

__all__ = ["QuantizedKVCache", "QuantizedLatentCache", "dense_cache", "latent_cache"]


def _rows(config, *, batch, capacity, heads, dim, axis, dtype, what, sink, window, codebook=None):
    g = config.group_size
    slots = sink + window if window else -(-capacity // g) * g
    return PackedRows.create(
        batch=batch, slots=slots, heads=heads, dim=dim, bits=config.bits, group=g,
        residual=config.residual, axis=axis, dtype=dtype, scale_dtype=config.scale_dtype,
        what=what, codebook=codebook,
    )  # fmt: skip


class _QuantizedMixin(_SlotsMixin):
    """The attention and byte accounting shared by the quantized caches (``_rows()``: the
    (key rows, value rows or None) pair)."""

    @property
    def capacity(self) -> int:
        """C, quantized slots per sequence (a full cache rounds its capacity up to a group)."""
        return self._rows()[0].codes_BCKW.shape[1]

    def bytes_per_token(self, context: int | None = None) -> float:
        """Exact storage bytes per token of one sequence.

        Args:
          context: None: a quantized token's bytes (codes, and its share of the scales and
            zeros), the limit at long contexts. An int: every buffer of a full cache built
            for ``context`` positions (codes and statistics of its slots, rounded up to a
            group, and the R-token full-precision windows), divided by ``context``; a ring's
            buffers are fixed, so its total is divided.
        """
        rows = [r for r in self._rows() if r is not None]
        if context is None:
            return float(sum(r.bytes_for(r.group) - r.fixed_bytes() for r in rows)) / rows[0].group
        slots = self.capacity if self.window else -(-context // rows[0].group) * rows[0].group
        return float(sum(r.bytes_for(slots) for r in rows)) / context

    def _attend_and_store(
        self, q_BTNH, new, num_new_B, *, mask, hide_BC=None, extra_tail=(), return_lse=False,
        key_fn=None, value_fn=None, attend_new=None, **op_kwargs,
    ):  # fmt: skip
        """(o_BTN_ in q's dtype, the new (key rows, value rows)); lengths unchanged.

        ``hide_BC``: bool [B, C], quantized slots not to read (held elsewhere at a higher
        precision); ``extra_tail``: further (kpos_Bs, k, v) blocks of stored tokens, in the
        storage dtype; ``return_lse``: also return the log-sum-exp over every key, [B, N, T].
        ``key_fn`` / ``value_fn``: ``f(rows_BsKH, slots_Bs, kpos_Bs)``, applied to every stored
        key / value row read (after dequantization; KVQuant's outliers and RoPE);
        ``attend_new``: the new tokens' (keys, values) as attended, when they differ from the
        rows ``new`` stores.
        """
        key_fn = key_fn or (lambda rows, slots, kpos: rows)
        value_fn = value_fn or (lambda rows, slots, kpos: rows)
        k_rows, v_rows = self._rows()
        k_new, v_new = new
        b, t = q_BTNH.shape[:2]
        n_B = self.lengths_B
        num_B = _num_new(num_new_B, t, b)
        dt = k_rows.dtype
        c, sink, window = self.capacity, self.sink, self.window
        if op_kwargs.get("dropout_rate"):
            raise NotImplementedError("a quantized cache's attention has no dropout")
        policy = SinkWindow(sinks=sink, window=window) if window else None
        vis = policy if mask is None else (mask if policy is None else mask & policy)
        # 1. the stored tokens: quantized blocks, then the positions m .. n - 1
        qk_B = k_rows.quantized_count(n_B)
        qv_B = qk_B if v_rows is None else v_rows.quantized_count(n_B)
        m_B = jnp.minimum(qk_B, qv_B)
        g = k_rows.group
        h = k_rows.dim
        sizes = op_kwargs.pop("block_sizes", None)  # the cached part's DecodeBlockSizes
        sizes = sizes if isinstance(sizes, DecodeBlockSizes) else DecodeBlockSizes()
        bk = sizes.keys_per_block(b, k_rows.codes_BCKW.shape[2], h, dt.itemsize)
        bk = min(max(g, bk // g * g), c)
        kpos_BC = key_positions(m_B, c, sink=sink, window=window)

        def read(i):
            lo = i * bk
            start = jnp.minimum(lo, c - bk)  # the last block slides back to end at C
            slots_s = start + jnp.arange(bk, dtype=jnp.int32)
            kpos = jax.lax.dynamic_slice_in_dim(kpos_BC, start, bk, axis=1)
            kpos = jnp.where(slots_s[None, :] >= lo, kpos, -1)
            if hide_BC is not None:
                hidden = jax.lax.dynamic_slice_in_dim(hide_BC, start, bk, axis=1)
                kpos = jnp.where(hidden, -1, kpos)
            slots = jnp.broadcast_to(slots_s[None, :], kpos.shape)
            v = None if v_rows is None else value_fn(v_rows.dequant_slots(start, bk), slots, kpos)
            return kpos, key_fn(k_rows.dequant_slots(start, bk), slots, kpos), v

        r = k_rows.residual
        tpos_BR = m_B[:, None] + jnp.arange(r, dtype=jnp.int32)[None, :]
        if window:
            slot_BR = jnp.where(tpos_BR < sink, tpos_BR, sink + (tpos_BR - sink) % window)
        else:
            slot_BR = jnp.minimum(tpos_BR, c - 1)

        def tail(rows, q_B):
            held = (tpos_BR < q_B[:, None])[:, :, None, None]
            return jnp.where(held, rows.dequant_at(slot_BR), rows.window_at(tpos_BR))

        tpos_tail = jnp.where(tpos_BR < n_B[:, None], tpos_BR, -1)
        v_tail = None if v_rows is None else value_fn(tail(v_rows, qv_B), slot_BR, tpos_tail)
        tail_block = (tpos_tail, key_fn(tail(k_rows, qk_B), slot_BR, tpos_tail), v_tail)
        num_blocks = -(-jnp.minimum(jnp.max(m_B), c) // bk)
        args = dict(scale=op_kwargs.get("scale"), logits_soft_cap=op_kwargs.get("logits_soft_cap"))
        o_old, lse_old = decode_over_blocks(
            q_BTNH, positions_BT(n_B, t), read, num_blocks, tail=[tail_block, *extra_tail],
            num_kv_heads=k_rows.codes_BCKW.shape[2],
            num_v_heads=None if v_rows is None else v_rows.codes_BCKW.shape[2],
            dtype=dt, mask=vis, **args,
        )  # fmt: skip
        # 2. the new tokens among themselves, in full precision
        if window:  # the ring's sinks are absolute positions: a dense mask of the new block
            pos_BT = positions_BT(n_B, t)
            qp, kp = pos_BT[:, :, None], pos_BT[:, None, :]
            new_mask = (kp <= qp) & ((kp < sink) | (qp - kp < window))
        else:  # Causal / SlidingWindow are relative: the new block starts at 0 for both
            new_mask = mask
        k_att, v_att = new if attend_new is None else attend_new
        kn = k_att.astype(dt)
        vn = kn if v_att is None else v_att.astype(dt)
        o_new, lse_new = dot_product_attention(
            q_BTNH.astype(dt), kn, vn, mask=new_mask, return_lse=True, **op_kwargs
        )
        o = _merge(o_old, lse_old, o_new, lse_new).astype(q_BTNH.dtype)
        if not window:  # defined overflow: NaN outputs past capacity (traced lengths)
            overflow_B = check_room(n_B, t, num_new_B, c)
            o = jnp.where(overflow_B[:, None, None, None], jnp.nan, o)
        # 3. store the new tokens
        kw = dict(sink=sink, window=window)
        k_rows = k_rows.store(n_B, k_new, num_B, **kw)
        v_rows = None if v_rows is None else v_rows.store(n_B, v_new, num_B, **kw)
        if return_lse:
            return o, (k_rows, v_rows), jnp.logaddexp(lse_old, lse_new)
        return o, (k_rows, v_rows)


def _merge(o1_BTNV, lse1_BNT, o2_BTNV, lse2_BNT):
    """Softmax over the union of two disjoint key sets from their outputs and log-sum-exps."""
    m = jnp.maximum(lse1_BNT, lse2_BNT)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    w1, w2 = jnp.exp(lse1_BNT - m), jnp.exp(lse2_BNT - m)
    den = w1 + w2
    den = jnp.where(den == 0, 1.0, den)
    w1, w2 = ((w / den).transpose(0, 2, 1)[..., None] for w in (w1, w2))
    return o1_BTNV.astype(jnp.float32) * w1 + o2_BTNV.astype(jnp.float32) * w2


@struct.dataclass
class QuantizedKVCache(_QuantizedMixin):
    """A dense K/V cache stored quantized (``CacheConfig.format`` "kivi" or "rotatekv").

    Attributes:
      k: keys [B, C, K, H] as ``PackedRows`` (per channel, groups of ``group_size`` tokens).
      v: values [B, C, K_v, V] as ``PackedRows`` (per token, groups of ``group_size`` channels).
      lengths_B: int32 [B] tokens seen per sequence.
      sink, window: the policy (static), as in ``KVCache``.
      rotate: "rotatekv" (static): keys and values are stored Hadamard-rotated per head; the
        queries are rotated alike and the outputs rotated back (``jaxattn.ops.kv_quant.hadamard``).
    """

    k: PackedRows
    v: PackedRows
    lengths_B: jax.Array
    sink: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=0)
    rotate: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls, *, batch, capacity, num_kv_heads, head_dim, v_head_dim=None, num_v_heads=None,
        dtype=jnp.bfloat16, config,
    ) -> QuantizedKVCache:  # fmt: skip
        """An empty cache (arguments as ``KVCache.create``; ``config`` of a quantized format).

        Raises:
          ValueError: ``config.group_size`` does not divide the value head dim, "rotatekv" with
            a head dim that is not a power of two, or a non-positive size (named).
        """
        _check_sizes(batch=batch, capacity=capacity, num_kv_heads=num_kv_heads, head_dim=head_dim)
        rotate = config.format == "rotatekv"
        for name, dim in (("head_dim", head_dim), ("v_head_dim", v_head_dim or head_dim)):
            if rotate and dim & (dim - 1):
                raise ValueError(
                    f"cache.format='rotatekv' rotates each head by a Hadamard transform: "
                    f"{name}={dim} must be a power of two"
                )
        sink, window, dtype = _policy(config, config.format, dtype)
        common = dict(batch=batch, capacity=capacity, dtype=dtype, sink=sink, window=window)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
        return cls(
            k=_rows(config, heads=num_kv_heads, dim=head_dim, axis="channel", what="key",
                    **common),
            v=_rows(config, heads=num_v_heads, dim=v_head_dim, axis="token", what="value",
                    **common),
            lengths_B=jnp.zeros((batch,), jnp.int32),
            sink=sink,
            window=window,
            rotate=rotate,
        )  # fmt: skip

    def _rows(self):
        return self.k, self.v

    def _rot(self, x):
        return hadamard(x) if self.rotate else x

    def _check_new(self, k_BTKH, v_BTKV):
        want_k = (self.k.codes_BCKW.shape[2], self.k.dim)
        want_v = (self.v.codes_BCKW.shape[2], self.v.dim)
        if k_BTKH.shape[2:] != want_k or v_BTKV.shape[2:] != want_v:
            raise ValueError(
                f"new k {k_BTKH.shape} / v {v_BTKV.shape} do not match the cache's "
                f"[K, H]={list(want_k)} / [K_v, V]={list(want_v)}"
            )

    def write(self, k_BTKH, v_BTKV, num_new_B=None) -> QuantizedKVCache:
        """Store T new keys/values after ``lengths_B`` (quantizing what completes); lengths
        unchanged (``advance`` counts them)."""
        self._check_new(k_BTKH, v_BTKV)
        num_B = _num_new(num_new_B, k_BTKH.shape[1], k_BTKH.shape[0])
        kw = dict(sink=self.sink, window=self.window)
        return self.replace(
            k=self.k.store(self.lengths_B, self._rot(k_BTKH), num_B, **kw),
            v=self.v.store(self.lengths_B, self._rot(v_BTKV), num_B, **kw),
        )

    def update_and_attend(
        self, q_BTNH, k_BTKH, v_BTKV, *, num_new_B=None, mask=None, **op_kwargs
    ) -> tuple[jax.Array, QuantizedKVCache]:
        """As ``KVCache.update_and_attend``, over the quantized cache (see the module)."""
        self._check_new(k_BTKH, v_BTKV)
        rot = self._rot
        o, (k, v) = self._attend_and_store(
            rot(q_BTNH), (rot(k_BTKH), rot(v_BTKV)), num_new_B, mask=mask, **op_kwargs
        )
        o = rot(o)  # H is its own inverse
        t = q_BTNH.shape[1]
        return o, self.replace(k=k, v=v).advance(t if num_new_B is None else num_new_B)


@struct.dataclass
class QuantizedLatentCache(_QuantizedMixin):
    """An MLA latent cache stored quantized: rows ``[c | k_rope]`` [B, C, 1, L + P] as one
    ``PackedRows`` per channel (the row is a key first; it is also the value).

    Attributes:
      row: the packed rows; lengths_B: int32 [B]; kv_lora_rank: L (static); sink, window.
    """

    row: PackedRows
    lengths_B: jax.Array
    kv_lora_rank: int = struct.field(pytree_node=False, default=0)
    sink: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(
        cls, *, batch, capacity, kv_lora_rank, rope_dim, dtype=jnp.bfloat16, config
    ) -> QuantizedLatentCache:
        """An empty quantized latent cache (arguments as ``LatentCache.create``).

        Raises:
          ValueError: a format the latent layout cannot store ("rotatekv"), or a bad size.
        """
        if config.format not in LAYOUT_FORMATS["latent"]:
            raise ValueError(
                f"cache.format={config.format!r} cannot be stored in a latent cache "
                f"(it stores {LAYOUT_FORMATS['latent']})"
            )
        _check_sizes(batch=batch, capacity=capacity, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)
        sink, window, dtype = _policy(config, config.format, dtype)
        row = _rows(
            config, batch=batch, capacity=capacity, heads=1, dim=kv_lora_rank + rope_dim,
            axis="channel", dtype=dtype, what="latent", sink=sink, window=window,
        )  # fmt: skip
        return cls(
            row=row, lengths_B=jnp.zeros((batch,), jnp.int32), kv_lora_rank=int(kv_lora_rank),
            sink=sink, window=window,
        )  # fmt: skip

    def _rows(self):
        return self.row, None

    @property
    def rope_dim(self) -> int:
        """P, the decoupled rope key width."""
        return self.row.dim - self.kv_lora_rank

    def _row(self, c_BTL, k_rope_BTP):
        return LatentCache._row(self, c_BTL, k_rope_BTP)[:, :, None, :]

    def write(self, c_BTL, k_rope_BTP, num_new_B=None) -> QuantizedLatentCache:
        """Store T new latent rows after ``lengths_B``; lengths unchanged."""
        row = self._row(c_BTL, k_rope_BTP)
        num_B = _num_new(num_new_B, row.shape[1], row.shape[0])
        return self.replace(
            row=self.row.store(self.lengths_B, row, num_B, sink=self.sink, window=self.window)
        )

    def update_and_attend(
        self, q_BTNR, c_BTL, k_rope_BTP, *, num_new_B=None, mask=None, **op_kwargs
    ) -> tuple[jax.Array, QuantizedLatentCache]:
        """As ``LatentCache.update_and_attend``, over the quantized rows (see the module)."""
        row_BT1R = self._row(c_BTL, k_rope_BTP)
        o, (row, _) = self._attend_and_store(
            q_BTNR, (row_BT1R, None), num_new_B, mask=mask, **op_kwargs
        )
        t = q_BTNR.shape[1]
        return o, self.replace(row=row).advance(t if num_new_B is None else num_new_B)


def _check_sizes(**sizes):
    for name, val in sizes.items():
        if int(val) <= 0:
            raise ValueError(f"{name}={val} must be positive")


def dense_cache(*, config=None, **shape):
    """The dense-layout cache ``config`` names: ``KVCache`` ("dense" / None),
    ``MixedPrecisionKVCache`` ("mikv"), ``KVQuantCache`` ("kvquant"), ``GearCache`` ("gear")
    or ``QuantizedKVCache`` (another quantized format). ``shape``: ``KVCache.create``'s
    arguments."""
    if config is not None and config.format == "mikv":
        from jaxattn.cache._mixed import MixedPrecisionKVCache  # it builds on this module

        return MixedPrecisionKVCache.create(config=config, **shape)
    if config is not None and config.format == "kvquant":
        from jaxattn.cache._kvquant import KVQuantCache  # it builds on this module

        return KVQuantCache.create(config=config, **shape)
    if config is not None and config.format == "gear":
        from jaxattn.cache._gear import GearCache  # it builds on this module

        return GearCache.create(config=config, **shape)
    if config is not None and config.quantized:
        return QuantizedKVCache.create(config=config, **shape)
    return KVCache.create(config=config, **shape)


def latent_cache(*, config=None, **shape):
    """The latent-layout cache ``config`` names: ``LatentCache`` ("latent" / None) or
    ``QuantizedLatentCache`` (a quantized format). ``shape``: ``LatentCache.create``'s."""
    if config is not None and config.quantized:
        return QuantizedLatentCache.create(config=config, **shape)
    return LatentCache.create(config=config, **shape)
