"""Public entry point of the Pallas TPU flash attention: checks, block sizes, custom VJP.

``flash_attention`` (TPU, Mosaic; ``api_gpu.flash_attention_gpu`` for Hopper) takes
[batch, seq, heads, dim] inputs (grouped kv heads, H may differ from V), pads the sequences
to block multiples, runs the forward kernel and, under differentiation, the dq and dk/dv
kernels with the forward's log-sum-exp as residual. ``unsupported_reason`` says in one
sentence when the kernels cannot serve a call. Block-visit lists (``block_visits``) AND with
the mask; they reach the kernels through the scalar-prefetched visit tables, so an unlisted
block costs neither compute nor DMA.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import block_tables
from pallas_kernels.flash_attention import _custom_vjp

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# Starting points per TPU generation (block_q, block_kv, block_q_bwd, block_kv_bwd), sized so
# the fp32 score tile and double-buffered k/v blocks fit VMEM with room to spare; not yet
# tuned on hardware (benchmarks/ is where they should be measured).
_DEFAULTS = {
    "v4": (256, 512, 256, 256),
    "v5 lite": (256, 512, 256, 256),
    "v5e": (256, 512, 256, 256),
    "v5": (512, 512, 256, 512),
    "v6": (512, 1024, 512, 512),
    "7": (512, 1024, 512, 512),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes of the kernels (sequences are padded to multiples; shorter ones shrink them).

    Attributes:
      block_q, block_kv: forward query / key tile lengths.
      block_q_bwd, block_kv_bwd: the same for the dq and dk/dv kernels.
    On hardware use multiples of 128 (tiles of the lane axis); interpret mode takes any
    multiple of 8.
    """

    block_q: int = 512
    block_kv: int = 512
    block_q_bwd: int = 256
    block_kv_bwd: int = 256

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
                raise ValueError(
                    f"BlockSizes.{f.name} must be a positive multiple of 8, got {value!r}"
                )

    @classmethod
    def default_for(cls, device_kind: str | None = None, *, head_dim: int = 128) -> BlockSizes:
        """Defaults for a device kind (e.g. ``"TPU v5 lite"``; default: the first device)."""
        if device_kind is None:
            device_kind = jax.devices()[0].device_kind
        kind = device_kind.lower()
        sizes = (512, 512, 256, 256)
        for key, value in _DEFAULTS.items():  # first match wins: "v5 lite" before "v5"
            if key in kind:
                sizes = value
                break
        bq, bkv, bq_b, bkv_b = sizes
        if head_dim > 128:  # wide heads: halve the kv tiles to keep VMEM use in bounds
            bkv, bkv_b = max(bkv // 2, 128), max(bkv_b // 2, 128)
        return cls(block_q=bq, block_kv=bkv, block_q_bwd=bq_b, block_kv_bwd=bkv_b)


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: object
    scale: float
    soft_cap: float | None
    blocks: tuple[int, int, int, int]  # effective (bq, bkv, bq_bwd, bkv_bwd)
    q_offset: int | None  # None: traced, passed as an operand
    return_lse: bool
    interpret: object
    backend: str = "tpu"  # which kernels: "tpu" (tpu.py) or "gpu" (gpu.py)


def static_offset(q_offset) -> int | None:
    """q_offset as a Python int, or None when it is traced."""
    try:
        return int(q_offset)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _effective_blocks(bs: BlockSizes, T: int, S: int, unit: int = 8) -> tuple[int, ...]:
    t8, s8 = _round_up(T, unit), _round_up(S, unit)
    return (
        min(bs.block_q, t8),
        min(bs.block_kv, s8),
        min(bs.block_q_bwd, t8),
        min(bs.block_kv_bwd, s8),
    )


def _check_hardware_blocks(blocks, T: int, S: int) -> None:
    """Mosaic tiles the lane axis by 128: blocks that split a sequence must be multiples."""
    names = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")
    for name, block, length in zip(names, blocks, (T, S, T, S), strict=True):
        if block % 128 and block < length:
            raise ValueError(
                f"BlockSizes.{name}={block} must be a multiple of 128 on TPU "
                f"hardware when the sequence ({length}) spans several blocks"
            )


def _split_segments(segment_ids, T, S):
    if segment_ids is None or isinstance(segment_ids, (tuple, list)):
        return segment_ids
    if T != S:
        raise ValueError(f"a single segment_ids array needs T == S, got {T=} and {S=}")
    return segment_ids, segment_ids


def _check_inputs(
    q_BTNH, k_BSKH, v_BSKV, segment_ids, q_offset, kv_lengths, scale, logits_soft_cap
):
    """Raises ValueError naming the argument and shapes for malformed inputs."""
    shapes = f"q_BTNH {q_BTNH.shape}, k_BSKH {k_BSKH.shape}, v_BSKV {v_BSKV.shape}"
    if not (q_BTNH.ndim == k_BSKH.ndim == v_BSKV.ndim == 4):
        raise ValueError(f"q, k and v must have rank 4 [batch, seq, heads, dim], got {shapes}")
    B, T, N, H = q_BTNH.shape
    if k_BSKH.shape[0] != B or v_BSKV.shape[0] != B:
        raise ValueError(f"q, k and v must share the batch size, got {shapes}")
    if k_BSKH.shape[:3] != v_BSKV.shape[:3]:
        raise ValueError(f"k and v must agree in batch, length and heads, got {shapes}")
    if k_BSKH.shape[3] != H:
        raise ValueError(f"q and k must share the head dim H, got {shapes}")
    K = k_BSKH.shape[2]
    if K == 0 or N % K:
        raise ValueError(f"query heads N must be a multiple of kv heads K, got {shapes}")
    if not (q_BTNH.dtype == k_BSKH.dtype == v_BSKV.dtype):
        raise ValueError(
            f"q, k and v must share a dtype, got {q_BTNH.dtype}, {k_BSKH.dtype}, {v_BSKV.dtype}"
        )
    S = k_BSKH.shape[1]
    if segment_ids is not None:
        q_seg, kv_seg = _split_segments(segment_ids, T, S)
        if jnp.shape(q_seg) != (B, T) or jnp.shape(kv_seg) != (B, S):
            raise ValueError(
                f"segment_ids must be (q [B, T], kv [B, S]) = ({(B, T)}, {(B, S)}),"
                f" got {jnp.shape(q_seg)} and {jnp.shape(kv_seg)}"
            )
    if kv_lengths is not None and jnp.shape(kv_lengths) != (B,):
        raise ValueError(f"kv_lengths must have shape [B] = {(B,)}, got {jnp.shape(kv_lengths)}")
    if jnp.ndim(q_offset) != 0 or not jnp.issubdtype(jnp.result_type(q_offset), jnp.integer):
        raise ValueError(f"q_offset must be an int or int32 scalar, got {q_offset!r}")
    for name, value in (("scale", scale), ("logits_soft_cap", logits_soft_cap)):
        if value is not None and not (isinstance(value, numbers.Real) and value > 0):
            raise ValueError(f"{name} must be a positive Python number, got {value!r}")


def visits_tuple(block_visits) -> tuple:
    """``block_visits`` (None, one ``BlockVisits`` or a sequence of them) as a tuple."""
    if block_visits is None:
        return ()
    if isinstance(block_visits, block_tables.BlockVisits):
        return (block_visits,)
    visits = tuple(block_visits)
    for v in visits:
        if not isinstance(v, block_tables.BlockVisits):
            raise ValueError(f"block_visits must hold BlockVisits, got {type(v).__name__}")
    return visits


def adapted_block_sizes(bs: BlockSizes, visits, unit: int) -> BlockSizes:
    """``bs`` with each block shrunk to the largest multiple of ``unit`` that divides the
    visit lists' blocks (so it nests inside them), where one exists."""
    if not visits:
        return bs

    def fit(value, outer):
        best = max((d for d in range(unit, value + 1, unit) if outer % d == 0), default=None)
        return value if best is None else best

    gq = math.gcd(*(v.block_q for v in visits))
    gk = math.gcd(*(v.block_kv for v in visits))
    return BlockSizes(
        block_q=fit(bs.block_q, gq),
        block_kv=fit(bs.block_kv, gk),
        block_q_bwd=fit(bs.block_q_bwd, gq),
        block_kv_bwd=fit(bs.block_kv_bwd, gk),
    )


def _visits_reason(visits, blocks, T: int, S: int) -> str | None:
    for v in visits:
        for bq, bkv in (blocks[:2], blocks[2:]):
            if not (
                block_tables.nests(T, bq, v.block_q) and block_tables.nests(S, bkv, v.block_kv)
            ):
                return (
                    f"the kernel's blocks ({bq=}, {bkv=}) must nest inside the visit lists' "
                    f"blocks (block_q={v.block_q}, block_kv={v.block_kv}); choose BlockSizes "
                    "that divide them"
                )
    return None


def unsupported_reason(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    mask=None,
    segment_ids=None,
    q_offset=0,
    kv_lengths=None,
    logits_soft_cap=None,
    block_sizes=None,
    block_visits=None,
) -> str | None:
    """None if the kernels can serve the call, else a sentence saying why not.

    Args: as ``flash_attention`` (``block_sizes`` matters for BlockSparse masks and visit
      lists).
    """
    q_offset = 0 if q_offset is None else q_offset
    del segment_ids, kv_lengths, logits_soft_cap
    if q_BTNH.shape[1] == 0 or k_BSKH.shape[1] == 0:
        return "the Pallas TPU flash attention needs non-empty q and kv sequences"
    if q_BTNH.dtype not in _DTYPES:
        return (
            f"the Pallas TPU flash attention supports float32/bfloat16/float16, not {q_BTNH.dtype}"
        )
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    visits = visits_tuple(block_visits)
    if visits:
        bs = block_sizes or adapted_block_sizes(
            BlockSizes.default_for(head_dim=q_BTNH.shape[-1]), visits, 8
        )
        reason = _visits_reason(visits, _effective_blocks(bs, T, S), T, S)
        if reason:
            return reason
    if mask is None:
        return None
    if not hasattr(mask, "block_visible"):
        return (
            "the Pallas TPU flash attention takes mask specs only, not dense mask arrays; "
            "use implementation='xla' or 'chunked' for a dense mask"
        )
    leaves = block_tables.array_leaves(mask)
    if not leaves:
        return None
    if static_offset(q_offset) is None:
        return "a BlockSparse mask needs a static (Python int) q_offset in the Pallas TPU kernel"
    if len(leaves) > 30:
        return "the Pallas TPU flash attention supports at most 30 BlockSparse leaves in a mask"
    bs = block_sizes or BlockSizes.default_for(head_dim=q_BTNH.shape[-1])
    eff = _effective_blocks(bs, T, S)
    for bq, bkv in (eff[:2], eff[2:]):
        if not block_tables.leaves_aligned(
            mask, q_len=T, kv_len=S, block_q=bq, block_kv=bkv, q_offset=int(q_offset)
        ):
            return (
                f"the BlockSparse cells do not contain whole kernel blocks ({bq=}, {bkv=}, "
                f"{q_offset=}); choose BlockSizes that divide the layout's blocks"
            )
    return None


def flash_attention(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    *,
    mask=None,
    segment_ids=None,
    q_offset=0,
    kv_lengths=None,
    scale=None,
    logits_soft_cap=None,
    block_sizes=None,
    block_visits=None,
    return_lse=False,
    interpret=False,
):
    """Flash attention on TPU (Pallas Mosaic), differentiable in q, k and v.

    Args:
      q_BTNH: queries [B, T, N, H]; k_BSKH: keys [B, S, K, H]; v_BSKV: values [B, S, K, V].
      mask: None or a mask spec (jaxattn.masks); query row i sits at position i + q_offset.
      segment_ids: None or (q_BT, kv_BS) int32: attend only where equal.
      q_offset: Python int (None means 0), or a traced int32 scalar (then the grid is not
        shortened to the mask's longest row, though masked blocks still skip compute and DMA).
      kv_lengths: None or int32 [B]: keys j >= kv_lengths[b] are masked.
      scale: logit scale, default 1/sqrt(H). logits_soft_cap: cap * tanh(logits / cap).
      block_sizes: BlockSizes, default ``BlockSizes.default_for()`` (with visit lists, shrunk
        to divide the lists' blocks).
      block_visits: None, a ``BlockVisits`` (jaxattn.masks.BlockVisits) or a sequence of them:
        per (batch row, kv head, query block) lists of the kv blocks that may be visited,
        ANDed with the mask; the kernel's blocks must nest inside the lists' blocks.
      return_lse: also return the log-sum-exp (its cotangent is honoured).
      interpret: False, True or a ``pltpu.InterpretParams`` (run on CPU).

    Returns:
      o_BTNV in q's dtype (zeros on rows with no visible key), and lse_BNT (float32, -inf on
      such rows) if ``return_lse``.
    """
    q_offset = 0 if q_offset is None else q_offset
    _check_inputs(q_BTNH, k_BSKH, v_BSKV, segment_ids, q_offset, kv_lengths, scale, logits_soft_cap)
    visits = check_visits(block_visits, q_BTNH, k_BSKH)
    reason = unsupported_reason(
        q_BTNH, k_BSKH, v_BSKV, mask=mask, q_offset=q_offset, block_sizes=block_sizes,
        block_visits=visits,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(reason)
    if interpret is True:
        from jax.experimental.pallas import tpu as pltpu

        interpret = pltpu.InterpretParams()
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    bs = block_sizes or adapted_block_sizes(
        BlockSizes.default_for(head_dim=q_BTNH.shape[-1]), visits, 8 if interpret else 128
    )
    blocks = _effective_blocks(bs, T, S)
    if not interpret:
        _check_hardware_blocks(blocks, T, S)
    return launch(
        "tpu", q_BTNH, k_BSKH, v_BSKV, blocks, mask, segment_ids, q_offset, kv_lengths, scale,
        logits_soft_cap, return_lse, interpret, visits,
    )  # fmt: skip


def check_visits(block_visits, q_BTNH, k_BSKH) -> tuple:
    """The visit lists, checked against the call's shapes (ValueError naming the field)."""
    B, T = q_BTNH.shape[:2]
    S, K = k_BSKH.shape[1:3]
    return tuple(
        v.check(batch=B, kv_heads=K, q_len=T, kv_len=S) for v in visits_tuple(block_visits)
    )


def launch(
    backend, q_BTNH, k_BSKH, v_BSKV, blocks, mask, segment_ids, q_offset, kv_lengths, scale,
    logits_soft_cap, return_lse, interpret, visits,
):  # fmt: skip
    """Static options and operands of ``_custom_vjp.flash`` for checked inputs; its result."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    offset = static_offset(q_offset)
    static = _Static(
        mask=mask,
        scale=float(q_BTNH.shape[-1] ** -0.5 if scale is None else scale),
        soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        blocks=blocks,
        q_offset=offset,
        return_lse=return_lse,
        interpret=interpret,
        backend=backend,
    )
    segs = _split_segments(segment_ids, T, S)
    if segs is not None:
        segs = tuple(jnp.asarray(s, jnp.int32) for s in segs)
    off = jnp.asarray(q_offset, jnp.int32) if offset is None else None
    lens = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    return _custom_vjp.flash(static, q_BTNH, k_BSKH, v_BSKV, segs, off, lens, visits)
