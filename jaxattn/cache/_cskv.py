"""CSKV's bi-branch cache as a storage format (PAPERS.md §2; ``CacheConfig(format="cskv")``).

CSKV (Wang et al. 2024) factors a layer's key and value projections ``k = x A_k B_k + b_k``,
``v = x A_v B_v + b_v`` (``jaxattn.convert.cskv``) and caches the low-dimensional features
``c_k = x A_k`` [r_k] and ``c_v = x A_v`` [r_v] of every token. ``CSKVCache`` stores, per
sequence:

* the features of every token (``capacity`` slots), in the storage dtype, or RTN-quantized
  per token to ``bits`` (2, 4, 8; symmetric, one fp32 scale per token and branch, codes packed
  8 // bits to a byte; what ``jaxattn.convert.cskv_compress_features`` computes);
* the exact branch: the full-precision keys and values of the last ``residual`` tokens (the
  layer's own K and V, as it computes them) in a ring of ``residual`` slots.

``update_and_attend`` writes the new tokens first, then every query attends over the exact
keys of the last ``residual`` of the S tokens seen so far and over the features of the older
ones, one softmax: for each step this is :func:`jaxattn.convert.cskv_attend` of that step's
queries over all S tokens (tested step by step), and with ``residual >= S`` it is exact
attention. The old branch absorbs the up-projections as MLA decodes: scores
``(q B_kᵀ) · c_kᵀ`` (plus ``q · b_k``), outputs ``(p c_v) B_v`` (plus ``Σp · b_v``), so neither
K nor V of an old token is materialised.

RoPE. The factors approximate the projection BEFORE the rotation (RoPE acts after ``x W_k``,
at each token's position, and does not commute with B_k), so the cached key features are
pre-RoPE. Passing the layer's ``rope`` makes the old branch up-project each old token's key
``c_k B_k + b_k`` and rotate it at its own position before the dot product (the value branch
stays absorbed: values carry no rotation); the exact branch holds the already rotated keys.
Absorbing B_k into the query is exact only without RoPE (the rotation depends on the key's
position): that is why MLA decouples a separate rope key, and CSKV keeps the rotation on the
reconstructed key instead.

Bytes: ``bytes_per_token()`` is one token's features (codes and scales when quantized), the
limit at long contexts; ``bytes_per_token(context)`` adds the fixed exact ring spread over
``context`` tokens. Both are the buffers' byte counts (tested against ``nbytes``).
Policy "full" only (every token's features are kept); a layer kind that builds this cache from
its own factors is not part of this module (the cache is driven through ``update_and_attend``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxattn.cache._base import _num_new, check_capacity, check_room, key_positions, write_rows
from jaxattn.ops.rope import apply_rope

__all__ = ["CSKVCache"]

_BITS = (2, 4, 8)


def _quantize(c_BTR: jax.Array, bits: int):
    """Symmetric per-token RTN of features: (codes uint8 [B, T, R·bits/8], scale fp32 [B, T])."""
    c = c_BTR.astype(jnp.float32)
    top = 2 ** (bits - 1) - 1
    s = jnp.max(jnp.abs(c), axis=-1) / top
    safe = jnp.where(s > 0, s, 1.0)
    q = jnp.clip(jnp.round(c / safe[..., None]), -top - 1, top).astype(jnp.int32) + (top + 1)
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], -1, per)
    packed = jnp.sum(q << (bits * jnp.arange(per, dtype=jnp.int32)), axis=-1)
    return packed.astype(jnp.uint8), s


def _dequantize(codes_BCW: jax.Array, s_BC: jax.Array, bits: int) -> jax.Array:
    """Features fp32 [B, C, R] of packed codes and per-token scales (``_quantize``'s inverse)."""
    per, top = 8 // bits, 2 ** (bits - 1) - 1
    shifts = bits * jnp.arange(per, dtype=jnp.int32)
    q = (codes_BCW.astype(jnp.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    q = q.reshape(*codes_BCW.shape[:-1], -1) - (top + 1)
    return q.astype(jnp.float32) * s_BC[..., None]


@struct.dataclass
class CSKVCache:
    """CSKV's bi-branch cache (see the module).

    Attributes:
      ck_BCW, cv_BCW: key / value features of every slot: [B, C, r] in the storage dtype, or
        packed uint8 codes [B, C, r·bits/8] when quantized.
      ck_scale_BC, cv_scale_BC: fp32 per-token scales [B, C] (quantized), else [B, 0].
      k_BWKH, v_BWKV: the exact branch: the last W = ``residual`` tokens' keys and values.
      lengths_B: int32 [B] tokens seen per sequence.
      bits: feature code width, or None (features in the storage dtype).
      rank_k, rank_v: the feature widths.
    """

    ck_BCW: jax.Array
    cv_BCW: jax.Array
    ck_scale_BC: jax.Array
    cv_scale_BC: jax.Array
    k_BWKH: jax.Array
    v_BWKV: jax.Array
    lengths_B: jax.Array
    bits: int | None = struct.field(pytree_node=False, default=None)
    rank_k: int = struct.field(pytree_node=False, default=0)
    rank_v: int = struct.field(pytree_node=False, default=0)

    sink = 0  # policy "full": features of every token; the ring is the exact branch only
    window = 0

    @classmethod
    def create(
        cls, *, batch, capacity, num_kv_heads, head_dim, rank_k, rank_v, v_head_dim=None,
        dtype=jnp.bfloat16, config,
    ) -> CSKVCache:  # fmt: skip
        """An empty cache.

        Args:
          batch, capacity: sequences and the most tokens per sequence.
          num_kv_heads, head_dim, v_head_dim: the layer's K and V layout (exact branch).
          rank_k, rank_v: the feature widths r_k, r_v (the factors' A columns).
          dtype: storage dtype (``config.dtype`` wins when set).
          config: a ``CacheConfig`` with ``format="cskv"``.

        Raises:
          ValueError: a bad size, or a rank whose codes do not fill whole bytes.
        """
        if config.format != "cskv":
            raise ValueError(f"CSKVCache needs CacheConfig(format='cskv'), got {config.format!r}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        for name, v in (("batch", batch), ("capacity", capacity), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("v_head_dim", v_head_dim), ("rank_k", rank_k),
                        ("rank_v", rank_v)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"CSKVCache.create: {name}={v!r} must be an int >= 1")
        bits = config.bits
        dt = config.storage_dtype(jnp.dtype(dtype))
        w = config.residual
        if bits is None:
            feat = lambda r: jnp.zeros((batch, capacity, r), dt)  # noqa: E731
            scale = jnp.zeros((batch, 0), jnp.float32)
        else:
            for name, r in (("rank_k", rank_k), ("rank_v", rank_v)):
                if (r * bits) % 8:
                    raise ValueError(
                        f"CSKVCache.create: {name}={r} times bits={bits} must fill whole bytes "
                        f"(a multiple of {8 // bits})"
                    )
            feat = lambda r: jnp.zeros((batch, capacity, r * bits // 8), jnp.uint8)  # noqa: E731
            scale = jnp.zeros((batch, capacity), jnp.float32)
        return cls(
            ck_BCW=feat(rank_k),
            cv_BCW=feat(rank_v),
            ck_scale_BC=scale,
            cv_scale_BC=scale,
            k_BWKH=jnp.zeros((batch, w, num_kv_heads, head_dim), dt),
            v_BWKV=jnp.zeros((batch, w, num_kv_heads, v_head_dim), dt),
            lengths_B=jnp.zeros((batch,), jnp.int32),
            bits=bits,
            rank_k=int(rank_k),
            rank_v=int(rank_v),
        )

    # -- protocol -----------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.ck_BCW.shape[1]

    @property
    def residual(self) -> int:
        return self.k_BWKH.shape[1]

    @property
    def max_positions(self) -> int:
        return self.capacity

    def positions_BT(self, t: int) -> jax.Array:
        """Positions [B, T] of the next T tokens."""
        return self.lengths_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

    def key_positions_BC(self) -> jax.Array:
        """The absolute position each feature slot holds, int32 [B, C] (-1: empty)."""
        return key_positions(self.lengths_B, self.capacity)

    def check_room(self, needed: int) -> None:
        """Raise ValueError when a sequence of ``needed`` tokens does not fit."""
        check_capacity(self.capacity, needed)

    def advance(self, num_new_B):
        return self.replace(lengths_B=self.lengths_B + jnp.asarray(num_new_B, jnp.int32))

    def with_lengths(self, lengths_B):
        return self.replace(
            lengths_B=jnp.broadcast_to(jnp.asarray(lengths_B, jnp.int32), self.lengths_B.shape)
        )

    def _feature_bytes(self) -> float:
        if self.bits is None:
            return (self.rank_k + self.rank_v) * self.ck_BCW.dtype.itemsize
        return (self.rank_k + self.rank_v) * self.bits / 8 + 2 * 4  # codes + two fp32 scales

    def bytes_per_token(self, context: int | None = None) -> float:
        """Exact storage bytes per token of one sequence.

        Args:
          context: None: one token's features (codes and scales), the long-context limit. An
            int: the features of ``context`` tokens plus the fixed exact ring, over ``context``.
        """
        if context is None:
            return float(self._feature_bytes())
        ring = self.residual * (
            self.k_BWKH.shape[2] * self.k_BWKH.shape[3] * self.k_BWKH.dtype.itemsize
            + self.v_BWKV.shape[2] * self.v_BWKV.shape[3] * self.v_BWKV.dtype.itemsize
        )
        return float(context * self._feature_bytes() + ring) / context

    def features(self) -> tuple[jax.Array, jax.Array]:
        """The stored features (dequantized), fp32 ([B, C, r_k], [B, C, r_v])."""
        if self.bits is None:
            return self.ck_BCW.astype(jnp.float32), self.cv_BCW.astype(jnp.float32)
        return (
            _dequantize(self.ck_BCW, self.ck_scale_BC, self.bits),
            _dequantize(self.cv_BCW, self.cv_scale_BC, self.bits),
        )

    def update_and_attend(
        self, q_BTNH, k_new_BTKH, v_new_BTKV, *, ck_new_BTR, cv_new_BTR, up_k_RKH, up_v_RKV,
        bias_k_KH=None, bias_v_KV=None, rope=None, num_new_B=None, scale=None,
    ):  # fmt: skip
        """Store T new tokens, then attend their queries over the bi-branch cache.

        Args:
          q_BTNH: queries [B, T, N, H] at positions ``lengths_B + t`` (rotated when the layer
            uses RoPE).
          k_new_BTKH, v_new_BTKV: the new tokens' exact keys (rotated) and values.
          ck_new_BTR, cv_new_BTR: their features ``x A_k``, ``x A_v``.
          up_k_RKH, up_v_RKV: the up-projections B_k, B_v reshaped [r, N_kv, H].
          bias_k_KH, bias_v_KV: the folded biases b' of the factored projections, or None.
          rope: the layer's ``RopeConfig`` (old keys are reconstructed and rotated at their
            positions), or None (no RoPE: keys absorbed into the query).
          num_new_B: valid new tokens per sequence (int or int [B]; default T).
          scale: the score scale (default 1/sqrt(H)).

        Returns:
          (o [B, T, N, V] in q's dtype, the cache advanced by ``num_new_B``).
        """
        b, t, n, h = q_BTNH.shape
        kv = self.k_BWKH.shape[2]
        if n % kv or k_new_BTKH.shape != (b, t, kv, h):
            raise ValueError(
                f"k_new_BTKH {k_new_BTKH.shape} must be [B={b}, T={t}, N_kv={kv}, H={h}] "
                f"with N_kv dividing N={n}"
            )
        for name, a, r in (("ck_new_BTR", ck_new_BTR, self.rank_k),
                           ("cv_new_BTR", cv_new_BTR, self.rank_v)):  # fmt: skip
            if a.shape != (b, t, r):
                raise ValueError(f"{name} {a.shape} must be [B={b}, T={t}, r={r}]")
        if up_k_RKH.shape != (self.rank_k, kv, h) or up_v_RKV.shape[:2] != (self.rank_v, kv):
            raise ValueError(
                f"up_k_RKH {up_k_RKH.shape} / up_v_RKV {up_v_RKV.shape} must be "
                f"[r_k={self.rank_k}, N_kv={kv}, H={h}] / [r_v={self.rank_v}, N_kv, V]"
            )
        start_B = self.lengths_B
        overflow_B = check_room(start_B, t, num_new_B, self.capacity)
        n_B = _num_new(num_new_B, t, b)
        end_B = start_B + n_B
        new = self._store(ck_new_BTR, cv_new_BTR, k_new_BTKH, v_new_BTKV, num_new_B)
        o = new._attend(q_BTNH, start_B, end_B, up_k_RKH, up_v_RKV, bias_k_KH, bias_v_KV, rope,
                        scale)  # fmt: skip
        o = jnp.where(overflow_B[:, None, None, None], jnp.nan, o)
        return o.astype(q_BTNH.dtype), new.replace(lengths_B=end_B)

    def _store(self, ck, cv, k, v, num_new_B):
        start_B, w = self.lengths_B, self.residual
        if self.bits is None:
            parts = dict(
                ck_BCW=write_rows(self.ck_BCW, ck, start_B, num_new_B),
                cv_BCW=write_rows(self.cv_BCW, cv, start_B, num_new_B),
            )
        else:
            (qk, sk), (qv, sv) = _quantize(ck, self.bits), _quantize(cv, self.bits)
            parts = dict(
                ck_BCW=write_rows(self.ck_BCW, qk, start_B, num_new_B),
                cv_BCW=write_rows(self.cv_BCW, qv, start_B, num_new_B),
                ck_scale_BC=write_rows(self.ck_scale_BC, sk, start_B, num_new_B),
                cv_scale_BC=write_rows(self.cv_scale_BC, sv, start_B, num_new_B),
            )
        if w:  # the ring keeps the last W of the tokens seen after this write
            parts["k_BWKH"] = write_rows(self.k_BWKH, k, start_B, num_new_B, window=w)
            parts["v_BWKV"] = write_rows(self.v_BWKV, v, start_B, num_new_B, window=w)
        return self.replace(**parts)

    def _attend(self, q_BTNH, start_B, end_B, up_k, up_v, bias_k, bias_v, rope, scale):
        b, t, n, h = q_BTNH.shape
        kv, w, c = self.k_BWKH.shape[2], self.residual, self.capacity
        g = n // kv
        scale = 1.0 / np.sqrt(h) if scale is None else scale
        f32 = jnp.float32
        q = q_BTNH.astype(f32).reshape(b, t, kv, g, h) * scale
        ck, cv = self.features()
        up_k, up_v = up_k.astype(f32), up_v.astype(f32)
        qpos_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        old_B1 = (end_B - w)[:, None]  # positions below: the features; from it: the ring
        # old branch: feature slot j holds position j
        j_1C = jnp.arange(c, dtype=jnp.int32)[None, :]
        vis_old_BTC = (j_1C[:, None, :] < old_B1[:, :, None]) & (
            j_1C[:, None, :] <= qpos_BT[:, :, None]
        )
        if rope is None:  # absorbed: (q B_kᵀ) · cᵀ
            s_old = jnp.einsum("btkgr,bcr->btkgc", jnp.einsum("btkgh,rkh->btkgr", q, up_k), ck)
        else:  # reconstruct the pre-RoPE keys and rotate each at its position
            k_old = jnp.einsum("bcr,rkh->bckh", ck, up_k)
            if bias_k is not None:
                k_old = k_old + bias_k.astype(f32)
            k_old = apply_rope(k_old, jnp.broadcast_to(j_1C, (b, c)), rope).astype(f32)
            s_old = jnp.einsum("btkgh,bckh->btkgc", q, k_old)
        if bias_k is not None and rope is None:
            s_old = s_old + jnp.einsum("btkgh,kh->btkg", q, bias_k.astype(f32))[..., None]
        # exact branch: ring slots by their positions after the write
        kpos_BW = key_positions(end_B, w, window=w) if w else jnp.zeros((b, 0), jnp.int32)
        vis_win_BTW = (
            (kpos_BW[:, None, :] >= 0)
            & (kpos_BW[:, None, :] >= old_B1[:, :, None])
            & (kpos_BW[:, None, :] <= qpos_BT[:, :, None])
        )
        s_win = jnp.einsum("btkgh,bwkh->btkgw", q, self.k_BWKH.astype(f32))
        vis = jnp.concatenate([vis_old_BTC, vis_win_BTW], axis=-1)[:, :, None, None, :]
        scores = jnp.where(vis, jnp.concatenate([s_old, s_win], axis=-1), -jnp.inf)
        top = jnp.max(scores, axis=-1, keepdims=True)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        e = jnp.where(vis, jnp.exp(scores - top), 0.0)
        den = e.sum(-1, keepdims=True)
        p = e / jnp.where(den > 0, den, 1.0)  # a fully masked row gives zeros
        p_old, p_win = p[..., :c], p[..., c:]
        o = jnp.einsum("btkgr,rkv->btkgv", jnp.einsum("btkgc,bcr->btkgr", p_old, cv), up_v)
        if bias_v is not None:
            o = o + p_old.sum(-1)[..., None] * bias_v.astype(f32)[None, None, :, None]
        o = o + jnp.einsum("btkgw,bwkv->btkgv", p_win, self.v_BWKV.astype(f32))
        return o.reshape(b, t, n, -1)
