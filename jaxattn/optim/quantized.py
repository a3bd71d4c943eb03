"""8-bit block-wise optimizer states (the dynamic-exponent code of 8-bit Adam).

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (bitsandbytes): a float tensor
``x`` is cut into blocks of ``block_size`` consecutive entries of its row-major flattening
(the last block may be short). Each block stores its absolute maximum ``a_b`` (fp32) and one
uint8 code per entry. Exact semantics:

* a block whose entries are all >= 0 uses the **unsigned** code map ``C⁺`` (256 values in
  [0, 1]), any other block the **signed** map ``C±`` (256 values in [-0.993, 1]); both are
  bitsandbytes' ``create_dynamic_map(signed)``: a decimal exponent 10^-6..10^0 then a linear
  fraction, so small values keep relative precision;
* quantise: ``code = argmin_c |x / a_b - C[c]|`` (nearest; an all-zero block has ``a_b = 0``
  and stores the code of 0);
* dequantise: ``x̂ = C[code] * a_b`` in fp32, and ``quantize(x̂)`` gives back the same codes.

So ``|x - x̂| <= a_b * max_gap / 2`` with ``max_gap = 0.0141`` (signed) / ``0.0071``
(unsigned), and at most ``0.0070 a_b`` for the entry ``-a_b`` of a signed block.

:func:`quantize_state` wraps any transform so that its large float state leaves live as
:class:`QuantizedArray` between steps: each step dequantises, runs the inner update in fp32
and quantises the new state. Storage per entry: 1 byte, plus 5 bytes per block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "QuantizedArray",
    "quantize",
    "dequantize",
    "quantize_state",
    "dynamic_code_map",
]


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` bit for bit (fp32 step, fused
    multiply-add from the nearer end), so the code maps equal bitsandbytes' exactly."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    head = (np.float64(start32) + step * i).astype(np.float32)
    tail = (np.float64(end32) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, head, tail)


def dynamic_code_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map`` (sorted fp32, ``2**total_bits`` values)."""
    data: list[np.ndarray] = []
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    counts = [
        2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        for i in range(max_exponent_bits)
    ]
    decades = list(range(max_exponent_bits))
    if additional > 0:
        counts.append(additional)
        decades.append(max_exponent_bits - 1)
    for count, i in zip(counts, decades):
        bounds = _torch_linspace(0.1, 1.0, count + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        decade = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += [decade * means] + ([-decade * means] if signed else [])
    data = [float(v) for block in data for v in block]
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return np.sort(np.asarray(data, np.float32))


_SIGNED = dynamic_code_map(True)
_UNSIGNED = dynamic_code_map(False)


class QuantizedArray(NamedTuple):
    """A float tensor in 8-bit blocks. ``codes``: uint8, the tensor's shape; ``absmax``: fp32
    ``[num_blocks]``; ``unsigned``: bool ``[num_blocks]`` (the block uses the unsigned map)."""

    codes: jax.Array
    absmax: jax.Array
    unsigned: jax.Array


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    flat = x.reshape(-1)
    pad = -flat.size % block_size
    return jnp.pad(flat, (0, pad)).reshape(-1, block_size)


def _unblock(b: jax.Array, shape) -> jax.Array:
    size = int(np.prod(shape))
    return b.reshape(-1)[:size].reshape(shape)


_BOTH = np.concatenate([_SIGNED, _UNSIGNED])  # map m is rows [256 m, 256 m + 256)


def _nearest(y: jax.Array, unsigned: jax.Array) -> jax.Array:
    """Per entry, the index of the nearest value of its map (the lower one on ties)."""
    c = jnp.asarray(_BOTH)
    base = jnp.where(unsigned, 256, 0)
    # branchless lower bound in the entry's own map: 8 lookups, no sort, no per-map pass
    pos = jnp.zeros(y.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        pos = jnp.where(c[base + pos + step - 1] < y, pos + step, pos)
    hi = jnp.clip(pos, 1, 255)
    lo = hi - 1
    near_lo = jnp.abs(y - c[base + lo]) <= jnp.abs(c[base + hi] - y)
    return jnp.where(near_lo, lo, hi).astype(jnp.uint8)


def quantize(x: jax.Array, block_size: int = 2048) -> QuantizedArray:
    """``x`` (any float dtype, any shape) as a :class:`QuantizedArray` (module docstring)."""
    b = _blocks(x.astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(b), axis=1)
    unsigned = jnp.all(b >= 0, axis=1)
    y = b / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    codes = _nearest(y, unsigned[:, None])
    return QuantizedArray(_unblock(codes, x.shape), absmax, unsigned)


def dequantize(q: QuantizedArray, block_size: int = 2048) -> jax.Array:
    """The fp32 tensor ``C[code] * absmax`` that ``q`` stores."""
    codes = _blocks(q.codes, block_size).astype(jnp.int32)
    values = jnp.asarray(_BOTH)[codes + jnp.where(q.unsigned, 256, 0)[:, None]]
    return _unblock(values * q.absmax[:, None], q.codes.shape)


class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`: the inner state with its large float leaves quantised."""

    inner: optax.OptState


def _is_q(x) -> bool:
    return isinstance(x, QuantizedArray)


def quantize_state(
    inner: optax.GradientTransformation, *, block_size: int = 2048, min_size: int = 4096
) -> optax.GradientTransformation:
    """``inner`` with its float state leaves of at least ``min_size`` entries stored in 8 bits.

    Smaller leaves and integer leaves (step counts) stay as they are (bitsandbytes keeps
    tensors under 4096 entries in fp32 too). Each update dequantises the state (fp32),
    runs ``inner.update`` and quantises the result, so the inner transform computes in fp32
    and only storage is 8-bit. A zero state (Adam's at init) quantises exactly, so the first
    step equals the unquantised one.

    Args:
      inner: any transform whose state is a pytree of arrays.
      block_size: entries per block (bitsandbytes uses 2048 for optimizer states).
      min_size: leaves with fewer entries are not quantised.
    """
    if block_size <= 0 or min_size < 0:
        raise ValueError(f"{block_size=} must be > 0 and {min_size=} >= 0")

    def pack(state):
        def one(x):
            if jnp.issubdtype(x.dtype, jnp.floating) and x.size >= min_size:
                return quantize(x, block_size)
            return x

        return QuantizedState(jax.tree.map(one, state))

    def unpack(state: QuantizedState):
        return jax.tree.map(
            lambda x: dequantize(x, block_size) if _is_q(x) else x, state.inner, is_leaf=_is_q
        )

    def init_fn(params):
        return pack(inner.init(params))

    def update_fn(updates, state, params=None):
        updates, new_inner = inner.update(updates, unpack(state), params)
        return updates, pack(new_inner)

    return optax.GradientTransformation(init_fn, update_fn)
