"""One quantized tensor of a cache: packed codes, per-group scales and zeros, a residual window.

``PackedRows`` stores token rows [B, C, K, H] (C slots under the cache's policy) as b-bit codes
packed along H (``jaxattn.ops.kv_quant``), and the most recent tokens in full precision in a
ring of R = ``residual`` slots (token p at slot p % R). Which tokens are quantized is a function
of the tokens seen, n, and the quantization axis (KIVI, PAPERS.md §5):

* ``axis="channel"`` (KIVI's keys): a group is one channel over ``group`` consecutive tokens;
  tokens are quantized R at a time when the window fills, so the first Q(n) = R·⌊n / R⌋ tokens
  are quantized and the last n − Q(n) < R are not. Scales and zeros: [B, C / group, K, H].
* ``axis="token"`` (KIVI's values): a group is one token over ``group`` consecutive channels;
  a token is quantized when it leaves the window of the last R, so Q(n) = max(n − R, 0).
  Scales and zeros: [B, C, K, H / group].

The stored state depends only on the token sequence, not on how it was split into writes: a
prefill of 1000 tokens and 1000 one-token steps store the same codes (tested). ``store`` runs
inside the compiled decode step: it gathers the pending tokens (the window and the new rows, at
most R + T), quantizes the ones that complete, scatters them to their policy slots (the same
``write_rows`` as the dense caches) and writes the new rows into the window.

A codebook (``levels_L``, KVQuant's non-uniform nuqX datatype) replaces the integer grid of the
codes by 2^b fitted levels (``jaxattn.ops.kv_quant.quantize(levels=)``); None: uniform codes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxattn.cache._base import write_rows
from jaxattn.ops.kv_quant import (
    dequantize,
    pack_codes,
    packed_width,
    quantize,
    unpack_codes,
    word_dtype,
)

__all__ = ["PackedRows"]

AXES = ("channel", "token")


@struct.dataclass
class PackedRows:
    """Quantized token rows with a full-precision window.

    Attributes:
      codes_BCKW: packed codes [B, C, K, W] (uint8, or uint32 for 3 bits).
      scale_BGKX / zero_BGKX: scales and zeros, [B, C / group, K, H] ("channel") or
        [B, C, K, H / group] ("token").
      window_BRKH: the R most recent tokens in full precision, token p at slot p % R.
      levels_L: None (uniform codes), or float32 [2^b] the codebook's sorted levels in code
        units [0, 2^b − 1]: one buffer for the whole batch (a layer's tensor), so a
        sequence's share in ``bytes_for`` is its size over B.
      bits, group, axis, dim (H): static.
    """

    codes_BCKW: jax.Array
    scale_BGKX: jax.Array
    zero_BGKX: jax.Array
    window_BRKH: jax.Array
    levels_L: jax.Array | None = None
    bits: int = struct.field(pytree_node=False, default=2)
    group: int = struct.field(pytree_node=False, default=32)
    axis: str = struct.field(pytree_node=False, default="channel")
    dim: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(
        cls, *, batch, slots, heads, dim, bits, group, residual, axis, dtype, scale_dtype, what,
        codebook=None,
    ) -> PackedRows:  # fmt: skip
        """Empty rows: ``slots`` (a multiple of ``group`` for "channel"), ``heads`` × ``dim``;
        ``codebook``: None, or 2^bits sorted levels in [0, 1] (a non-uniform datatype).

        Raises:
          ValueError: ``group`` does not divide ``dim`` ("token"), naming ``what``.
        """
        if axis not in AXES:
            raise ValueError(f"axis={axis!r} must be one of {AXES}")
        if axis == "token" and dim % group:
            raise ValueError(
                f"CacheConfig.group_size={group} must divide the {what} head dim {dim} "
                f"({what}s are quantized per token in groups of group_size channels)"
            )
        if axis == "channel" and slots % group:
            raise ValueError(f"slots={slots} must be a multiple of group={group}")
        stats = (batch, slots // group, heads, dim) if axis == "channel" else (
            batch, slots, heads, dim // group
        )  # fmt: skip
        return cls(
            codes_BCKW=jnp.zeros((batch, slots, heads, packed_width(dim, bits)), word_dtype(bits)),
            scale_BGKX=jnp.zeros(stats, scale_dtype),
            zero_BGKX=jnp.zeros(stats, scale_dtype),
            window_BRKH=jnp.zeros((batch, residual, heads, dim), dtype),
            levels_L=None
            if codebook is None
            else jnp.asarray(codebook, jnp.float32) * ((1 << bits) - 1),
            bits=int(bits),
            group=int(group),
            axis=axis,
            dim=int(dim),
        )

    @property
    def residual(self) -> int:
        """R, the full-precision window."""
        return self.window_BRKH.shape[1]

    @property
    def dtype(self):
        """The full-precision (window and dequantization) dtype."""
        return self.window_BRKH.dtype

    def quantized_count(self, n_B: jax.Array) -> jax.Array:
        """Q(n): how many of the first tokens are quantized after n tokens (int32 [B])."""
        n_B = n_B.astype(jnp.int32)
        r = self.residual
        return (n_B // r) * r if self.axis == "channel" else jnp.maximum(n_B - r, 0)

    def window_bytes(self) -> int:
        """Bytes of one sequence's full-precision window: R·K·H·itemsize."""
        return math.prod(self.window_BRKH.shape[1:]) * self.dtype.itemsize

    def codebook_share(self) -> float:
        """One sequence's share of the codebook: its bytes over B (the batch shares one)."""
        if self.levels_L is None:
            return 0.0
        return self.levels_L.size * self.levels_L.dtype.itemsize / self.codes_BCKW.shape[0]

    def fixed_bytes(self) -> float:
        """Bytes of one sequence's buffers that do not grow with the tokens: the window and
        its share of the codebook (``codebook_share``)."""
        return self.window_bytes() + self.codebook_share()

    def bytes_for(self, slots: int) -> float:
        """Bytes of one sequence's buffers with ``slots`` quantized slots (a multiple of
        ``group`` for "channel"): codes, scales, zeros, the window and its share of the
        codebook, so B · ``bytes_for`` is every buffer of the batch."""
        _, c, k, w = self.codes_BCKW.shape
        stats = math.prod(self.scale_BGKX.shape[2:]) * (
            slots // self.group if self.axis == "channel" else slots
        )
        return (
            slots * k * w * self.codes_BCKW.dtype.itemsize
            + 2 * stats * self.scale_BGKX.dtype.itemsize
            + self.fixed_bytes()
        )

    def _dequant(self, codes_BsKW, scale, zero):
        c = unpack_codes(codes_BsKW, self.bits, self.dim)
        if self.axis == "channel":  # one scale per channel for each group of tokens
            b, s, k, h = c.shape
            c = c.reshape(b, s // self.group, self.group, k, h)
            out = dequantize(c, scale[:, :, None], zero[:, :, None], self.dtype, self.levels_L)
            return out.reshape(b, s, k, h)
        b, s, k, h = c.shape  # one scale per token for each group of channels
        c = c.reshape(b, s, k, h // self.group, self.group)
        out = dequantize(c, scale[..., None], zero[..., None], self.dtype, self.levels_L)
        return out.reshape(b, s, k, h)

    def dequant_slots(self, start, size: int) -> jax.Array:
        """Slots [start, start + size) dequantized, [B, size, K, H] (start and size multiples
        of ``group`` for "channel")."""
        codes = jax.lax.dynamic_slice_in_dim(self.codes_BCKW, start, size, axis=1)
        if self.axis == "channel":
            g = self.group
            scale = jax.lax.dynamic_slice_in_dim(self.scale_BGKX, start // g, size // g, axis=1)
            zero = jax.lax.dynamic_slice_in_dim(self.zero_BGKX, start // g, size // g, axis=1)
        else:
            scale = jax.lax.dynamic_slice_in_dim(self.scale_BGKX, start, size, axis=1)
            zero = jax.lax.dynamic_slice_in_dim(self.zero_BGKX, start, size, axis=1)
        return self._dequant(codes, scale, zero)

    def dequant_at(self, slots_BS: jax.Array) -> jax.Array:
        """Individual slots [B, S] (in range) dequantized, [B, S, K, H]."""
        bi = jnp.arange(slots_BS.shape[0])[:, None]
        c = unpack_codes(self.codes_BCKW[bi, slots_BS], self.bits, self.dim)
        if self.axis == "channel":
            scale, zero = (x[bi, slots_BS // self.group] for x in (self.scale_BGKX, self.zero_BGKX))
            return dequantize(c, scale, zero, self.dtype, self.levels_L)
        b, s, k, h = c.shape
        scale, zero = (x[bi, slots_BS][..., None] for x in (self.scale_BGKX, self.zero_BGKX))
        c = c.reshape(b, s, k, h // self.group, self.group)
        return dequantize(c, scale, zero, self.dtype, self.levels_L).reshape(b, s, k, h)

    def window_at(self, pos_BS: jax.Array) -> jax.Array:
        """The window rows of positions [B, S] (their slot p % R), [B, S, K, H]."""
        bi = jnp.arange(pos_BS.shape[0])[:, None]
        return self.window_BRKH[bi, pos_BS % self.residual]

    def store(self, n_B, new_BTKH, num_new_B, *, sink: int = 0, window: int = 0) -> PackedRows:
        """Append T new rows after n_B tokens: quantize the tokens that complete, window the rest.

        Args:
          n_B: int32 [B] tokens stored so far.
          new_BTKH: the new rows at positions n_B[b] + t.
          num_new_B: int32 [B] valid new rows per sequence.
          sink, window: the quantized slots' policy (as ``write_rows``; 0: full).
        """
        b, t = new_BTKH.shape[:2]
        r, g = self.residual, self.group
        n_B = n_B.astype(jnp.int32)
        end_B = n_B + num_new_B
        q_old, q_new = self.quantized_count(n_B), self.quantized_count(end_B)
        # pending tokens: positions q_old + i, from the window while < n, then the new rows
        p = r + t
        p = -(-p // g) * g if self.axis == "channel" else p
        pos_BP = q_old[:, None] + jnp.arange(p, dtype=jnp.int32)[None, :]
        from_new = jnp.clip(pos_BP - n_B[:, None], 0, t - 1)
        bi = jnp.arange(b)[:, None]
        pend_BPKH = jnp.where(
            (pos_BP < n_B[:, None])[:, :, None, None],
            self.window_at(pos_BP),
            new_BTKH.astype(self.dtype)[bi, from_new],
        )
        k, h = pend_BPKH.shape[2:]
        sd, lv = self.scale_BGKX.dtype, self.levels_L
        if self.axis == "channel":
            grouped = pend_BPKH.reshape(b, p // g, g, k, h)
            codes, scale, zero = quantize(grouped, self.bits, 2, scale_dtype=sd, levels=lv)
            codes, scale, zero = codes.reshape(b, p, k, h), scale[:, :, 0], zero[:, :, 0]
            stat_kw = dict(sink=sink // g, window=window // g)
            stat_old, stat_num = q_old // g, (q_new - q_old) // g
        else:
            grouped = pend_BPKH.reshape(b, p, k, h // g, g)
            codes, scale, zero = quantize(grouped, self.bits, -1, scale_dtype=sd, levels=lv)
            codes, scale, zero = codes.reshape(b, p, k, h), scale[..., 0], zero[..., 0]
            stat_kw = dict(sink=sink, window=window)
            stat_old, stat_num = q_old, q_new - q_old
        kw = dict(sink=sink, window=window)
        return self.replace(
            codes_BCKW=write_rows(
                self.codes_BCKW, pack_codes(codes, self.bits), q_old, q_new - q_old, **kw
            ),
            scale_BGKX=write_rows(self.scale_BGKX, scale, stat_old, stat_num, **stat_kw),
            zero_BGKX=write_rows(self.zero_BGKX, zero, stat_old, stat_num, **stat_kw),
            window_BRKH=write_rows(self.window_BRKH, new_BTKH, n_B, num_new_B, window=r),
        )
