"""Attention kernels under ``jax.jit`` on sharded inputs, through ``jax.shard_map``.

A Pallas kernel is a per-device program: it cannot be partitioned by XLA, so it runs inside
``jax.shard_map`` on each device's block. The batch is split over the mesh axes of the
logical name "batch" and the heads over those of "act_heads" / "act_kv_heads" (the one rules
table, ``jaxattn.sharding``). Query heads and kv heads are split by the same factor, so shard
i holds kv heads ``[i*K/t, (i+1)*K/t)`` and exactly their query heads ``[i*N/t, (i+1)*N/t)``:
whole GQA groups, and no communication. Sequence and head-dim axes stay whole.

    fn = shard_attention(my_kernel, mesh)                   # fn(q_BTNH, k_BSKH, v_BSKV, *extra)
    decode = sharded_decode_attention(mesh, interpret=True)  # decode(q, k, v, kv_lengths)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh

from jaxattn.sharding import logical_to_spec
from pallas_kernels.decode_attention import decode_attention_tpu

__all__ = ["shard_attention", "sharded_decode_attention", "attention_specs"]

Q_NAMES = ("batch", None, "act_heads", None)  # q_BTNH and o_BTNV
KV_NAMES = ("batch", None, "act_kv_heads", None)  # k_BSKH, v_BSKV (kv axis kept whole)
LSE_NAMES = ("batch", "act_heads", None)  # lse_BNT


def _axis_size(mesh: Mesh, entry) -> int:
    """Number of shards a PartitionSpec entry (None, an axis name or a tuple) makes."""
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[a] for a in names)


def attention_specs(mesh: Mesh, extra_ndims: Sequence[int] = (), with_lse: bool = False):
    """PartitionSpecs for ``(q, k, v, *extra)`` and the output of a sharded attention call.

    Args:
      mesh: the device mesh.
      extra_ndims: rank of each extra argument; each is batch-leading (kv_lengths_B,
        segment ids ...) and split like the batch.
      with_lse: the output is ``(o_BTNV, lse_BNT)`` rather than ``o_BTNV``.

    Returns:
      (in_specs tuple, out_specs).
    """
    q_spec = logical_to_spec(Q_NAMES, mesh)
    kv_spec = logical_to_spec(KV_NAMES, mesh)
    extra = tuple(logical_to_spec(("batch",) + (None,) * (n - 1), mesh) for n in extra_ndims)
    out = (q_spec, logical_to_spec(LSE_NAMES, mesh)) if with_lse else q_spec
    return (q_spec, kv_spec, kv_spec, *extra), out


def _check_divisible(mesh: Mesh, q_BTNH, k_BSKH, extra) -> None:
    q_spec = logical_to_spec(Q_NAMES, mesh)
    kv_spec = logical_to_spec(KV_NAMES, mesh)
    B, _, N, _ = q_BTNH.shape
    K = k_BSKH.shape[2]
    nb, nq, nk = (_axis_size(mesh, s) for s in (q_spec[0], q_spec[2], kv_spec[2]))
    if nq != nk:
        raise ValueError(f"query and kv heads are split differently: {q_spec=} vs {kv_spec=}")
    if K % nk:
        raise ValueError(
            f"kv-head count {K=} must be divisible by the tensor axis size {nk} (spec "
            f"{kv_spec[2]!r}), so that each shard keeps whole GQA groups; got q "
            f"{q_BTNH.shape}, k {k_BSKH.shape}"
        )
    if N % K:
        raise ValueError(f"query heads {N=} must be a multiple of kv heads {K=}")
    for name, x in [("q", q_BTNH), ("k", k_BSKH)] + [
        (f"extra[{i}]", e) for i, e in enumerate(extra)
    ]:
        if x.shape[0] != B or B % nb:
            raise ValueError(
                f"{name} batch {x.shape[0]} must equal {B=} and divide by the batch shards {nb} "
                f"(spec {q_spec[0]!r})"
            )


def shard_attention(fn: Callable, mesh: Mesh, *, with_lse: bool = False, check_vma: bool = False):
    """Wrap a per-device attention ``fn`` to run on batch- and head-sharded inputs.

    Args:
      fn: ``fn(q_BTNH, k_BSKH, v_BSKV, *extra) -> o_BTNV`` (or ``(o_BTNV, lse_BNT)`` when
        ``with_lse``), written for one device's block; ``extra`` are batch-leading arrays.
      mesh: the mesh; axes it lacks are simply not used.
      with_lse: ``fn`` returns ``(o, lse)``.
      check_vma: passed to ``jax.shard_map``. Off by default: a ``pallas_call`` under
        ``check_vma=True`` needs its out_shape annotated with how it varies over the mesh,
        which kernels written for one device do not do.

    Returns:
      ``wrapped(q_BTNH, k_BSKH, v_BSKV, *extra)`` with the same outputs, usable under jit.

    Raises (when called):
      ValueError: the kv-head count does not divide by the head shards, or the batch does not
        divide by the batch shards.
    """

    def wrapped(q_BTNH, k_BSKH, v_BSKV, *extra):
        _check_divisible(mesh, q_BTNH, k_BSKH, extra)
        in_specs, out_specs = attention_specs(mesh, [e.ndim for e in extra], with_lse)
        return jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
        )(q_BTNH, k_BSKH, v_BSKV, *extra)

    return wrapped


def sharded_decode_attention(mesh: Mesh, **kernel_kwargs) -> Callable:
    """``pallas_kernels.decode_attention.decode_attention_tpu`` over a mesh:
    ``f(q_BTNH, k_BCKH, v_BCKV, kv_lengths_B)``.

    Args:
      mesh: the mesh (batch over "batch" axes, heads over "act_heads"/"act_kv_heads" axes).
      **kernel_kwargs: keyword arguments of ``decode_attention_tpu`` (scale, window, block_sizes,
        return_lse, interpret ...). Splits and block sizes apply per device.

    Returns:
      The wrapped function; returns o_BTNV, and lse_BNT when ``return_lse=True``.
    """
    fn = functools.partial(decode_attention_tpu, **kernel_kwargs)
    return shard_attention(fn, mesh, with_lse=bool(kernel_kwargs.get("return_lse", False)))
