"""Validation and normalisation of the attention op's arguments, and the elementwise mask.

Every implementation of ``jaxattn.dot_product_attention`` receives an :class:`AttentionArgs`
(checked before any tracing work) and builds its visibility masks with
:func:`visible`, so all implementations agree on what is masked by construction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import MaskSpec

__all__ = ["AttentionArgs", "check_args", "visible"]


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    """Normalised attention call. Shapes use DESIGN.md's alphabet.

    Attributes:
      spec: the declarative mask, or None.
      dense: bool array [B or 1, N or 1, T, S] (a dense mask), or None.
      q_segment_ids / kv_segment_ids: int32 [B, T] / [B, S], or None.
      q_offset: None, a Python int, or an int32 array of shape [] or [B].
      kv_lengths: int32 [B] or None.
    """

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    V: int
    scale: float
    logits_soft_cap: float | None
    spec: MaskSpec | None
    dense: Any
    q_segment_ids: Any
    kv_segment_ids: Any
    q_offset: Any
    kv_lengths: Any

    @property
    def G(self) -> int:
        return self.N // self.K

    @property
    def static_q_offset(self) -> int | None:
        """The offset when it is known at trace time (None if it is an array)."""
        if self.q_offset is None:
            return 0
        return self.q_offset if isinstance(self.q_offset, int) else None


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _check_int_array(name: str, x, shape: tuple[int, ...]):
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    if _shape(x) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {_shape(x)}")
    return jnp.asarray(x, jnp.int32)


def check_args(
    q_BTNH, k_BSKH, v_BSKV, *, mask, scale, logits_soft_cap, segment_ids, q_offset, kv_lengths
) -> AttentionArgs:
    """Validate the op's arguments and normalise them.

    Raises:
      ValueError: naming the offending argument and its shape, for any bad input.
    """
    for name, x in (("q", q_BTNH), ("k", k_BSKH), ("v", v_BSKV)):
        if len(_shape(x)) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, dim], got {_shape(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")
    B, T, N, H = _shape(q_BTNH)
    Bk, S, K, Hk = _shape(k_BSKH)
    Bv, Sv, Kv, V = _shape(v_BSKV)
    if not (q_BTNH.dtype == k_BSKH.dtype == v_BSKV.dtype):
        raise ValueError(
            f"q, k, v must share a dtype, got q {q_BTNH.dtype}, k {k_BSKH.dtype}, v {v_BSKV.dtype}"
        )
    if Bk != B or Bv != B:
        raise ValueError(
            f"batch sizes differ: q {_shape(q_BTNH)}, k {_shape(k_BSKH)}, v {_shape(v_BSKV)}"
        )
    if (Sv, Kv) != (S, K):
        raise ValueError(f"k {_shape(k_BSKH)} and v {_shape(v_BSKV)} must agree on seq and heads")
    if Hk != H:
        raise ValueError(
            f"q head dim {H} != k head dim {Hk} (q {_shape(q_BTNH)}, k {_shape(k_BSKH)})"
        )
    if K == 0 or N % K:
        raise ValueError(
            f"query heads N={N} must be a multiple of kv heads K={K} "
            f"(q {_shape(q_BTNH)}, k {_shape(k_BSKH)})"
        )
    if min(B, T, S, H, V) == 0:
        raise ValueError(
            f"empty dimension in q {_shape(q_BTNH)}, k {_shape(k_BSKH)}, v {_shape(v_BSKV)}"
        )

    if scale is None:
        scale = 1.0 / math.sqrt(H)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    if logits_soft_cap is not None and (
        not isinstance(logits_soft_cap, (int, float)) or logits_soft_cap <= 0
    ):
        raise ValueError(
            f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}"
        )

    spec = dense = None
    if isinstance(mask, MaskSpec):
        spec = mask
    elif mask is not None:
        if not hasattr(mask, "dtype") or not hasattr(mask, "shape"):
            raise ValueError(f"mask must be a jaxattn.masks spec or a bool array, got {type(mask)}")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask array must be bool, got dtype {mask.dtype}")
        allowed = {(T, S): (1, 1, T, S), (B, T, S): (B, 1, T, S), (B, N, T, S): (B, N, T, S)}
        if _shape(mask) not in allowed:
            raise ValueError(
                f"mask array must have shape [T, S]={(T, S)}, [B, T, S]={(B, T, S)} or "
                f"[B, N, T, S]={(B, N, T, S)}, got {_shape(mask)}"
            )
        dense = jnp.reshape(jnp.asarray(mask), allowed[_shape(mask)])

    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be one array or a pair (q_BT, kv_BS)")
            q_seg, kv_seg = segment_ids
        else:
            if T != S:
                raise ValueError(
                    f"a single segment_ids array needs T == S, got T={T}, S={S}; "
                    "pass a pair (q_BT, kv_BS)"
                )
            q_seg = kv_seg = segment_ids
        q_seg = _check_int_array("segment_ids (query side)", q_seg, (B, T))
        kv_seg = _check_int_array("segment_ids (kv side)", kv_seg, (B, S))

    if q_offset is not None and not isinstance(q_offset, int):
        if isinstance(q_offset, (np.integer,)):
            q_offset = int(q_offset)
        else:
            if _shape(q_offset) not in ((), (B,)):
                raise ValueError(
                    f"q_offset must be an int, a scalar or a [B]={B} array, "
                    f"got shape {_shape(q_offset)}"
                )
            q_offset = _check_int_array("q_offset", q_offset, _shape(q_offset))
    if isinstance(q_offset, bool) or (isinstance(q_offset, int) and q_offset < 0):
        raise ValueError(f"q_offset must be a non-negative int, got {q_offset!r}")
    if kv_lengths is not None:
        kv_lengths = _check_int_array("kv_lengths", kv_lengths, (B,))

    return AttentionArgs(
        B=B,
        T=T,
        S=S,
        N=N,
        K=K,
        H=H,
        V=V,
        scale=float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        spec=spec,
        dense=dense,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
    )


def q_positions(a: AttentionArgs, q_idx):
    """Positions on the kv axis of query rows ``q_idx`` [t]: shape [1 or B, t]."""
    q_idx = q_idx[None, :]
    if a.q_offset is None:
        return q_idx
    off = jnp.asarray(a.q_offset, jnp.int32)
    return q_idx + (off[:, None] if off.ndim == 1 else off)


def visible(a: AttentionArgs, q_idx, k_idx, dense_block=None):
    """Which (query, key) pairs may attend, for query rows ``q_idx`` [t] and keys ``k_idx`` [s].

    Indices past T or S (block padding) are masked. ``dense_block`` is the matching slice
    [B or 1, N or 1, t, s] of the dense mask when the caller already sliced it.

    Returns:
      bool [B or 1, K or 1, G or 1, t, s], to broadcast against scores_BKGts.
    """
    q_pos = q_positions(a, q_idx)[:, :, None]  # [b, t, 1]
    k_idx2 = k_idx[None, None, :]  # [1, 1, s]
    vis = (q_idx[None, :, None] < a.T) & (k_idx2 < a.S)
    if a.spec is not None:
        vis = vis & a.spec(q_pos, k_idx2)
    if a.kv_lengths is not None:
        vis = vis & (k_idx2 < a.kv_lengths[:, None, None])
    if a.q_segment_ids is not None:
        qs = jnp.take(a.q_segment_ids, jnp.clip(q_idx, 0, a.T - 1), axis=1)
        ks = jnp.take(a.kv_segment_ids, jnp.clip(k_idx, 0, a.S - 1), axis=1)
        vis = vis & (qs[:, :, None] == ks[:, None, :])
    vis = vis[:, None, None]  # [b, 1, 1, t, s]
    if a.dense is not None:
        if dense_block is None:
            dense_block = a.dense
        b, n = dense_block.shape[:2]
        g = a.G if n > 1 else 1
        vis = vis & dense_block.reshape(b, n // g, g, *dense_block.shape[2:])
    return vis


def scores_fp32(a: AttentionArgs, q_BtKGH, k_BsKH, spec: str = "btkgh,bskh->bkgts"):
    """Scaled (and soft-capped) logits in float32: [B, K, G, t, s] (or as ``spec`` lays out)."""
    precision = jax.lax.Precision.HIGHEST if q_BtKGH.dtype == jnp.float32 else None
    s = jnp.einsum(
        spec,
        q_BtKGH,
        k_BsKH,
        preferred_element_type=jnp.float32,
        precision=precision,
    )
    s = s * a.scale
    if a.logits_soft_cap is not None:
        # soft cap after scaling (Gemma 2): cap * tanh(s / cap)
        s = a.logits_soft_cap * jnp.tanh(s / a.logits_soft_cap)
    return s
