"""Validation and normalisation of the attention op's arguments.

Every implementation of ``jaxattn.dot_product_attention`` receives an :class:`AttentionArgs`,
checked before any tracing work. Concrete values are validated (errors name the argument);
traced values cannot be, and behave as documented on ``dot_product_attention``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import BlockVisits, MaskSpec, split_dynamic

__all__ = ["AttentionArgs", "check_args"]


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    """Normalised attention call. Shapes use DESIGN.md's alphabet.

    Attributes:
      K: key heads; Kv: value heads (each divides N; they differ only when asked).
      scale: a Python float, or a float32 scalar array (traced; treated as a constant).
      spec: the static declarative mask, or None.
      dense: bool array [B or 1, N or 1, T, S] (a dense mask), or None.
      q_segment_ids / kv_segment_ids: int32 [B, T] / [B, S], or None.
      q_offset: None, a Python int, or an int32 array of shape [] or [B].
      kv_lengths: int32 [B] or None.
      visits: checked ``BlockVisits`` (the ``block_visits`` argument and dynamic BlockSparse
        layouts), ANDed.
      dropout_rate: probability of dropping an attention probability (0: none).
      dropout_seeds: uint32 [B, N, 2] key words per (batch row, query head), or None.
    """

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    V: int
    scale: Any
    logits_soft_cap: float | None
    spec: MaskSpec | None
    dense: Any
    q_segment_ids: Any
    kv_segment_ids: Any
    q_offset: Any
    kv_lengths: Any
    Kv: int = 0
    visits: tuple = ()
    dropout_rate: float = 0.0
    dropout_seeds: Any = None

    def __post_init__(self):
        if not self.Kv:
            object.__setattr__(self, "Kv", self.K)

    @property
    def G(self) -> int:
        """Query heads per key head."""
        return self.N // self.K

    @property
    def static_q_offset(self) -> int | None:
        """The offset when it is known at trace time (None if it is an array)."""
        if self.q_offset is None:
            return 0
        return self.q_offset if isinstance(self.q_offset, int) else None


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _concrete(x):
    """``x`` as numpy, or None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_int_array(name: str, x, shape: tuple[int, ...]):
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == np.bool_:
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    if _shape(x) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {_shape(x)}")
    return jnp.asarray(x, jnp.int32)


def _real_scalar(name: str, x, *, traced_ok: bool):
    """A positive finite real scalar as a float (or a float32 array when traced and allowed).

    Accepts Python and numpy numbers and 0-d arrays; rejects bools, strings, non-scalars.
    """
    if isinstance(x, (bool, np.bool_)) or not (
        isinstance(x, (int, float, np.number)) or (hasattr(x, "dtype") and _shape(x) == ())
    ):
        raise ValueError(f"{name} must be a positive real number, got {x!r}")
    if hasattr(x, "dtype") and not (
        jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    ):
        raise ValueError(f"{name} must be a positive real number, got dtype {x.dtype}")
    value = _concrete(x)
    if value is None:
        if not traced_ok:
            raise ValueError(f"{name} must be a concrete number (a static option), got a tracer")
        # a traced scale is used as a constant: no gradient flows to it
        return jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_heads(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(_shape(x)) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, seq, heads, dim], got {_shape(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")
    (B, T, N, H), (Bk, S, K, Hk), (Bv, Sv, Kv, V) = _shape(q), _shape(k), _shape(v)
    shapes = f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: {shapes}")
    if Sv != S:
        raise ValueError(f"k {_shape(k)} and v {_shape(v)} must agree on seq")
    if Hk != H:
        raise ValueError(f"q head dim {H} != k head dim {Hk} (q {_shape(q)}, k {_shape(k)})")
    for what, heads in (("kv heads K", K), ("value heads", Kv)):
        if heads == 0 or N % heads:
            raise ValueError(
                f"query heads N={N} must be a multiple of {what}={heads} (N % K == 0 for keys, "
                f"N % K_v == 0 for values): {shapes}"
            )
    if min(B, T, S, H, V) == 0:
        raise ValueError(f"empty dimension in {shapes}")
    return B, T, S, N, K, H, V, Kv


def _check_mask(mask, B, T, S, N):
    """(static spec, dense [B|1, N|1, T, S], dynamic BlockSparse leaves)."""
    if isinstance(mask, MaskSpec):
        spec, dynamic = split_dynamic(mask)
        return spec, None, dynamic
    if mask is None:
        return None, None, []
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
    return None, jnp.reshape(jnp.asarray(mask), allowed[_shape(mask)]), []


def _check_segments(segment_ids, B, T, S):
    if segment_ids is None:
        return None, None
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
    return q_seg, _check_int_array("segment_ids (kv side)", kv_seg, (B, S))


def _check_positions(q_offset, kv_lengths, B, S):
    """q_offset in [0, S] and kv_lengths in [0, S] where concrete."""
    if isinstance(q_offset, (bool, np.bool_)):
        raise ValueError(f"q_offset must be an int or an int array, got {q_offset!r}")
    if isinstance(q_offset, np.integer):
        q_offset = int(q_offset)
    if q_offset is not None and not isinstance(q_offset, int):
        if _shape(q_offset) not in ((), (B,)):
            raise ValueError(
                f"q_offset must be an int, a scalar or a [B]={B} array, "
                f"got shape {_shape(q_offset)}"
            )
        q_offset = _check_int_array("q_offset", q_offset, _shape(q_offset))
    value = _concrete(q_offset) if q_offset is not None else None
    if value is not None and value.size and (value.min() < 0 or value.max() > S):
        raise ValueError(
            f"q_offset (the position of query row 0 on the kv axis) must lie in [0, S={S}], "
            f"got {q_offset if isinstance(q_offset, int) else value.tolist()}"
        )
    if kv_lengths is not None:
        kv_lengths = _check_int_array("kv_lengths", kv_lengths, (B,))
        value = _concrete(kv_lengths)
        if value is not None and (value.min() < 0 or value.max() > S):
            raise ValueError(f"kv_lengths must lie in [0, S={S}], got {value.tolist()}")
    return q_offset, kv_lengths


def _check_dropout(rate, rng, B, N):
    """(rate as a float, uint32 seeds [B, N, 2] or None)."""
    if isinstance(rate, (bool, np.bool_)) or not (
        isinstance(rate, (int, float, np.number)) or (hasattr(rate, "dtype") and _shape(rate) == ())
    ):
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {rate!r}")
    value = _concrete(rate)
    if value is None:
        raise ValueError("dropout_rate must be a concrete number in [0, 1) (a static option)")
    rate = float(value)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return 0.0, None
    if rng is None:
        raise ValueError(f"dropout_rate={rate} > 0 needs dropout_rng (a jax.random key)")
    if not hasattr(rng, "dtype"):
        raise ValueError(f"dropout_rng must be a jax.random key, got {type(rng).__name__}")
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.dtype != jnp.uint32 or _shape(rng) != (2,):
            raise ValueError(
                f"dropout_rng must be a jax.random.key() or a raw uint32[2] key, got dtype "
                f"{rng.dtype} shape {_shape(rng)}"
            )
        rng = jax.random.wrap_key_data(rng)
    if _shape(rng) != ():
        raise ValueError(f"dropout_rng must be a single key, got shape {_shape(rng)}")
    # Key words per (batch row, query head); each probability's bits then come from a counter-
    # based hash of (row, key) (see attention_math.dropout_keep), the same in every layout.
    return rate, jax.random.bits(rng, (B, N, 2), jnp.uint32)


def check_args(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    mask,
    scale,
    logits_soft_cap,
    segment_ids,
    q_offset,
    kv_lengths,
    block_visits=None,
    dropout_rate=0.0,
    dropout_rng=None,
) -> AttentionArgs:
    """Validate the op's arguments and normalise them.

    Raises:
      ValueError: naming the offending argument and its shape, for any bad input.
    """
    B, T, S, N, K, H, V, Kv = _check_heads(q_BTNH, k_BSKH, v_BSKV)
    scale = 1.0 / math.sqrt(H) if scale is None else _real_scalar("scale", scale, traced_ok=True)
    if logits_soft_cap is not None:
        logits_soft_cap = _real_scalar("logits_soft_cap", logits_soft_cap, traced_ok=False)
    spec, dense, dynamic = _check_mask(mask, B, T, S, N)
    q_seg, kv_seg = _check_segments(segment_ids, B, T, S)
    q_offset, kv_lengths = _check_positions(q_offset, kv_lengths, B, S)
    visits = []
    if block_visits is not None:
        if not isinstance(block_visits, BlockVisits):
            raise ValueError(
                f"block_visits must be a jaxattn.masks.BlockVisits, got {type(block_visits)}"
            )
        visits.append(block_visits.check(batch=B, kv_heads=K, q_len=T, kv_len=S))
    for i, leaf in enumerate(dynamic):
        where = f"mask's BlockSparse #{i} (dynamic layout)"
        lowered = leaf.to_visits(q_len=T, kv_len=S, q_offset=q_offset, name=where)
        visits.append(lowered.check(batch=B, kv_heads=K, q_len=T, kv_len=S, name=where))
    rate, seeds = _check_dropout(dropout_rate, dropout_rng, B, N)
    return AttentionArgs(
        B=B,
        T=T,
        S=S,
        N=N,
        K=K,
        H=H,
        V=V,
        Kv=Kv,
        scale=scale,
        logits_soft_cap=logits_soft_cap,
        spec=spec,
        dense=dense,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        visits=tuple(visits),
        dropout_rate=rate,
        dropout_seeds=seeds,
    )
