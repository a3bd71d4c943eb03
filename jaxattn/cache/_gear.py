"""GEAR as a streaming cache format: quantized backbone + low-rank residual + sparse outliers.

``GearCache`` (``CacheConfig(format="gear")``, dense layout, policy "full") stores each head's
keys and values as GEAR's three parts (Kang et al. 2024; PAPERS.md §5; the one-matrix
reference is ``jaxattn.ops.gear.gear_approximation``), streamed as in the paper:

* a buffer of the n_b = ``residual`` most recent tokens in full precision; every n_b tokens
  the buffer is compressed at once (``PackedRows`` "channel" axis for keys AND values: the
  first Q(n) = n_b·⌊n / n_b⌋ tokens are compressed, the rest are in the buffer);
* S, the sparse outliers: per token vector the O = ceil(outliers · H) entries of largest
  magnitude, kept exactly in a side table (KVQuant's ``split_outliers``) and zeroed before
  quantization;
* D̂, the b-bit quantization of the rest, per channel over groups of ``group_size`` tokens
  (KIVI's key scheme, here also for values so that both flush every n_b tokens);
* L = A·B, per compressed block of n_b tokens and head, the best rank-r fit (truncated SVD)
  of the block's residual X − S − D̂ (zero at outlier entries): A [n_b, r] stored per token,
  B [r, H] per block, fitted inside the compiled step that compresses the block.

A compressed row reads D̂ + L + S (D̂ taken as 0 at S's entries, whose residual L is fitted
as 0): each block and head is ``gear_approximation(x, axis="channel", outliers_per="vector",
fill="zero")`` of its n_b tokens (tested); rank min(n_b, H) reproduces X exactly, rank 0 is
quantization with exact outliers, rank 0 and no outliers is KIVI's per-channel quantization.
Attention is ``_QuantizedMixin``'s (block-wise dequantization, the fp buffer, the new tokens
in fp, one softmax), with ``key_fn`` / ``value_fn`` adding L and S to each block as it is read.
Not implemented: GEAR's power-iteration SVD (an exact SVD is used) and per-token value
quantization (GEAR-KCVT's values).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import _num_new, write_rows
from jaxattn.cache._dense import _policy
from jaxattn.cache._kvquant import _index_dtype, restore_outliers, split_outliers
from jaxattn.cache._packed import PackedRows
from jaxattn.cache._quantized import QuantizedKVCache, _check_sizes, _QuantizedMixin, _rows

__all__ = ["GearCache"]


@struct.dataclass
class GearPart:
    """One tensor (keys or values) of a ``GearCache``.

    Attributes:
      rows: the quantized backbone and fp buffer (``PackedRows``, per channel), outliers zeroed.
      val_BCKO, idx_BCKO: each slot's outliers (values, channel indices).
      a_BCKr: each compressed token's row of its block's left factor A.
      b_BJKrH: each compressed block's right factor B (J = ceil(C / n_b) blocks).
    """

    rows: PackedRows
    val_BCKO: jax.Array
    idx_BCKO: jax.Array
    a_BCKr: jax.Array
    b_BJKrH: jax.Array

    @classmethod
    def create(cls, rows: PackedRows, *, outliers: float, rank: int) -> GearPart:
        b, c, k, _ = rows.codes_BCKW.shape
        h, dt, r = rows.dim, rows.dtype, rows.residual
        o = math.ceil(outliers * h)
        return cls(
            rows=rows,
            val_BCKO=jnp.zeros((b, c, k, o), dt),
            idx_BCKO=jnp.zeros((b, c, k, o), _index_dtype(h)),
            a_BCKr=jnp.zeros((b, c, k, rank), dt),
            b_BJKrH=jnp.zeros((b, -(-c // r), k, rank, h), dt),
        )

    def side_bytes(self, slots: int) -> int:
        """Bytes of one sequence's outlier tables and low-rank factors for ``slots`` slots."""
        per_slot = sum(math.prod(x.shape[2:]) * x.dtype.itemsize
                       for x in (self.val_BCKO, self.idx_BCKO, self.a_BCKr))  # fmt: skip
        per_block = math.prod(self.b_BJKrH.shape[2:]) * self.b_BJKrH.dtype.itemsize
        return slots * per_slot + -(-slots // self.rows.residual) * per_block

    def read_fn(self):
        """``key_fn`` / ``value_fn``: D̂ + S (S written over its entries, where D̂ is taken as
        0), then + L, as the paper's sum and ``jaxattn.ops.gear.gear_approximation``.

        Slots not yet compressed have A = 0 (policy "full" writes a slot once), so buffer
        rows get their outliers back only.
        """
        r = self.rows.residual

        def fn(rows_BsKH, slots_Bs, kpos_Bs):
            bi = jnp.arange(rows_BsKH.shape[0])[:, None]
            rows_BsKH = restore_outliers(rows_BsKH, self.val_BCKO[bi, slots_Bs],
                                         self.idx_BCKO[bi, slots_Bs])  # fmt: skip
            if not self.a_BCKr.shape[-1]:
                return rows_BsKH
            a = self.a_BCKr[bi, slots_Bs].astype(jnp.float32)
            bf = self.b_BJKrH[bi, slots_Bs // r].astype(jnp.float32)
            low = jnp.einsum("bskr,bskrh->bskh", a, bf)
            return (rows_BsKH.astype(jnp.float32) + low).astype(rows_BsKH.dtype)

        return fn

    def store(self, n_B, x_BTKH, num_B, split) -> GearPart:
        """Append T new rows (``split``: their ``split_outliers``); compress completed blocks."""
        dense, val, idx = split
        rows = self.rows.store(n_B, dense, num_B)
        tables = dict(
            val_BCKO=write_rows(self.val_BCKO, val, n_B, num_B),
            idx_BCKO=write_rows(self.idx_BCKO, idx, n_B, num_B),
        )
        new = self.replace(rows=rows, **tables)
        if not self.a_BCKr.shape[-1]:
            return new
        q_old, q_new = rows.quantized_count(n_B), rows.quantized_count(n_B + num_B)
        fit = lambda: new._fit(self.rows, n_B, dense, q_old, q_new)  # noqa: E731
        a, bf = jax.lax.cond(jnp.any(q_new > q_old), fit, lambda: (new.a_BCKr, new.b_BJKrH))
        return new.replace(a_BCKr=a, b_BJKrH=bf)

    def _fit(self, old: PackedRows, n_B, dense_BTKH, q_old, q_new):
        """The low-rank factors of the blocks compressed by this step (positions q_old ..)."""
        b, t = dense_BTKH.shape[:2]
        r, c, rank = self.rows.residual, self.rows.codes_BCKW.shape[1], self.a_BCKr.shape[-1]
        p = -(-(r + t) // r) * r
        pos_BP = q_old[:, None] + jnp.arange(p, dtype=jnp.int32)[None, :]
        bi = jnp.arange(b)[:, None]
        from_new = jnp.clip(pos_BP - n_B[:, None], 0, t - 1)
        x_BPKH = jnp.where(
            (pos_BP < n_B[:, None])[:, :, None, None],
            old.window_at(pos_BP),
            dense_BTKH.astype(old.dtype)[bi, from_new],
        ).astype(jnp.float32)
        slots_BP = jnp.clip(pos_BP, 0, c - 1)
        deq = self.rows.dequant_at(slots_BP).astype(jnp.float32)
        h = x_BPKH.shape[-1]
        idx = self.idx_BCKO[bi, slots_BP].astype(jnp.int32)
        hit = jnp.any(idx[..., None] == jnp.arange(h), axis=-2) if idx.shape[-1] else False
        resid = jnp.where(hit, 0.0, x_BPKH - deq)  # S holds the outlier entries exactly
        k = resid.shape[2]
        blocks = resid.reshape(b, p // r, r, k, h).transpose(0, 1, 3, 2, 4)  # [B, J, K, R, H]
        u, s, vt = jnp.linalg.svd(blocks, full_matrices=False)
        a = (u[..., :rank] * s[..., None, :rank]).transpose(0, 1, 3, 2, 4).reshape(b, p, k, rank)
        bf = vt[..., :rank, :]  # [B, J, K, r, H]
        dt = self.a_BCKr.dtype
        a_new = write_rows(self.a_BCKr, a.astype(dt), q_old, q_new - q_old)
        b_new = write_rows(self.b_BJKrH, bf.astype(dt), q_old // r, (q_new - q_old) // r)
        return a_new, b_new

    def reconstruct(self, n_B) -> jax.Array:
        """Every slot as attention reads it, [B, C, K, H] (slots at or past n_B: zeros)."""
        b, c = self.rows.codes_BCKW.shape[:2]
        pos_BC = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
        held = (pos_BC < self.rows.quantized_count(n_B)[:, None])[:, :, None, None]
        rows = jnp.where(held, self.rows.dequant_at(pos_BC), self.rows.window_at(pos_BC))
        out = self.read_fn()(rows, pos_BC, pos_BC)
        return jnp.where((pos_BC < n_B[:, None])[:, :, None, None], out, 0)


@struct.dataclass
class GearCache(_QuantizedMixin):
    """A dense K/V cache in GEAR's format (see the module).

    Attributes:
      k, v: the keys' and values' ``GearPart``; lengths_B: int32 [B] tokens seen.
    """

    k: GearPart
    v: GearPart
    lengths_B: jax.Array
    sink: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(
        cls, *, batch, capacity, num_kv_heads, head_dim, v_head_dim=None, num_v_heads=None,
        dtype=jnp.bfloat16, config,
    ) -> GearCache:  # fmt: skip
        """An empty cache (arguments as ``KVCache.create``; ``config.format == "gear"``).

        Raises:
          ValueError: ``config.rank`` above min(residual, head dim), or a bad size (named).
        """
        _check_sizes(batch=batch, capacity=capacity, num_kv_heads=num_kv_heads, head_dim=head_dim)
        _, _, dtype = _policy(config, "gear", dtype)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        num_v_heads = num_kv_heads if num_v_heads is None else num_v_heads
        for name, dim in (("head_dim", head_dim), ("v_head_dim", v_head_dim)):
            if config.rank > min(config.residual, dim):
                raise ValueError(
                    f"CacheConfig.rank={config.rank} must be <= min(residual={config.residual}, "
                    f"{name}={dim}) (the rank of a compressed block's residual)"
                )
        common = dict(batch=batch, capacity=capacity, dtype=dtype, sink=0, window=0,
                      axis="channel")  # fmt: skip
        part = lambda rows: GearPart.create(rows, outliers=config.outliers, rank=config.rank)  # noqa: E731
        return cls(
            k=part(_rows(config, heads=num_kv_heads, dim=head_dim, what="key", **common)),
            v=part(_rows(config, heads=num_v_heads, dim=v_head_dim, what="value", **common)),
            lengths_B=jnp.zeros((batch,), jnp.int32),
        )

    def _rows(self):
        return self.k.rows, self.v.rows

    def _check_new(self, k_BTKH, v_BTKV):
        QuantizedKVCache._check_new(self.replace(k=self.k.rows, v=self.v.rows), k_BTKH, v_BTKV)

    def bytes_per_token(self, context: int | None = None) -> float:
        """Exact storage bytes per token of one sequence.

        Args:
          context: None: a compressed token's bytes (codes, its share of scales and zeros, its
            outlier tables, its row of A and its share of its block's B). An int: every
            buffer of a cache built for ``context`` positions over ``context``.
        """
        g = self.k.rows.group
        if context is None:
            r = self.k.rows.residual
            side = sum(p.side_bytes(r) for p in (self.k, self.v)) / r
            return super().bytes_per_token() + side
        slots = -(-context // g) * g
        side = sum(p.side_bytes(slots) for p in (self.k, self.v))
        return super().bytes_per_token(context) + side / context

    def reconstruct(self) -> tuple[jax.Array, jax.Array]:
        """(keys [B, C, K, H], values [B, C, K_v, V]): D̂ + L + S of the compressed tokens and
        the buffer's rows, as attention reads them (zeros past ``lengths_B``)."""
        return self.k.reconstruct(self.lengths_B), self.v.reconstruct(self.lengths_B)

    def _split(self, k_BTKH, v_BTKV):
        k_BTKH, v_BTKV = k_BTKH.astype(self.k.rows.dtype), v_BTKV.astype(self.v.rows.dtype)
        return (split_outliers(k_BTKH, self.k.val_BCKO.shape[-1]),
                split_outliers(v_BTKV, self.v.val_BCKO.shape[-1]))  # fmt: skip

    def write(self, k_BTKH, v_BTKV, num_new_B=None) -> GearCache:
        """Store T new keys / values after ``lengths_B`` (compressing completed blocks);
        lengths unchanged."""
        self._check_new(k_BTKH, v_BTKV)
        num_B = _num_new(num_new_B, k_BTKH.shape[1], k_BTKH.shape[0])
        ks, vs = self._split(k_BTKH, v_BTKV)
        n_B = self.lengths_B
        return self.replace(k=self.k.store(n_B, k_BTKH, num_B, ks),
                            v=self.v.store(n_B, v_BTKV, num_B, vs))  # fmt: skip

    def update_and_attend(
        self, q_BTNH, k_BTKH, v_BTKV, *, num_new_B=None, mask=None, **op_kwargs
    ) -> tuple[jax.Array, GearCache]:
        """As ``KVCache.update_and_attend``, over the GEAR cache (see the module)."""
        self._check_new(k_BTKH, v_BTKV)
        b, t = q_BTNH.shape[:2]
        num_B = _num_new(num_new_B, t, b)
        ks, vs = self._split(k_BTKH, v_BTKV)
        o, _ = self._attend_and_store(
            q_BTNH, (ks[0], vs[0]), num_new_B, mask=mask, key_fn=self.k.read_fn(),
            value_fn=self.v.read_fn(), attend_new=(k_BTKH, v_BTKV), **op_kwargs,
        )  # fmt: skip
        new = self.write(k_BTKH, v_BTKV, num_B)
        return o, new.advance(num_B)
