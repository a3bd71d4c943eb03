"""The differentiable core of flash_attention: layout changes, padding, custom VJP.

Kernels work head-major on padded sequences ([B, N, Tp, H]); this module transposes and
pads on the way in, slices and transposes on the way out, and pairs the forward kernel with
the dq and dk/dv kernels. Forward and backward pad to their own block multiples; residuals
are the original inputs, the output and the (unpadded) lse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import block_tables
from pallas_kernels.flash_attention import tpu, tpu_bwd


def _config(cls, st, groups, bq, bkv, has_segments):
    return cls(
        mask=st.mask,
        scale=st.scale,
        soft_cap=st.soft_cap,
        has_segments=has_segments,
        groups=groups,
        block_q=bq,
        block_kv=bkv,
    )


class _TpuKernels:
    """Adapts tpu.py / tpu_bwd.py to the common calling convention below.

    Convention: segs = (q_seg [B, Tp], kv_seg [B, Sp]) or None; lse and delta [B, N, Tp].
    """

    @staticmethod
    def config(st, groups, bq, bkv, has_segments):
        return _config(tpu.Config, st, groups, bq, bkv, has_segments)

    @staticmethod
    def forward(q, k, v, seg, offset, kv_len, bmap, cfg, interpret):
        q_seg = kv_seg = None
        if seg is not None:
            q_seg, kv_seg = seg[0][:, :, None], seg[1][:, None, :]
        o, lse_BNT1 = tpu.forward(q, k, v, q_seg, kv_seg, offset, kv_len, bmap, cfg, interpret)
        return o, lse_BNT1[..., 0]

    @staticmethod
    def dq(q, k, v, do, lse, delta, seg, offset, kv_len, bmap, cfg, interpret):
        q_seg = kv_seg = None
        if seg is not None:
            q_seg, kv_seg = seg[0][:, :, None], seg[1][:, None, :]
        return tpu_bwd.backward_dq(
            q, k, v, do, lse[:, :, None], delta[:, :, None], q_seg, kv_seg, offset, kv_len,
            bmap, cfg, interpret,
        )  # fmt: skip

    @staticmethod
    def dkv(q, k, v, do, lse, delta, seg, offset, kv_len, bmap_t, cfg, interpret):
        q_seg = kv_seg = None
        if seg is not None:
            q_seg, kv_seg = seg[0][:, None, :], seg[1][:, :, None]
        return tpu_bwd.backward_dkv(
            q, k, v, do, lse[:, :, None], delta[:, :, None], q_seg, kv_seg, offset, kv_len,
            bmap_t, cfg, interpret,
        )  # fmt: skip


class _GpuKernels:
    """Adapts gpu.py / gpu_bwd.py (imported lazily: Mosaic GPU) to the same convention."""

    @staticmethod
    def config(st, groups, bq, bkv, has_segments):
        from pallas_kernels.flash_attention import gpu

        return _config(gpu.Config, st, groups, bq, bkv, has_segments)

    @staticmethod
    def forward(q, k, v, seg, offset, kv_len, bmap, cfg, interpret):
        from pallas_kernels.flash_attention import gpu

        segs = (None, None) if seg is None else seg
        return gpu.forward(q, k, v, *segs, offset, kv_len, bmap, cfg, interpret)

    @staticmethod
    def dq(q, k, v, do, lse, delta, seg, offset, kv_len, bmap, cfg, interpret):
        from pallas_kernels.flash_attention import gpu_bwd

        segs = (None, None) if seg is None else seg
        return gpu_bwd.backward_dq(
            q, k, v, do, lse, delta, *segs, offset, kv_len, bmap, cfg, interpret
        )

    @staticmethod
    def dkv(q, k, v, do, lse, delta, seg, offset, kv_len, bmap_t, cfg, interpret):
        from pallas_kernels.flash_attention import gpu_bwd

        segs = (None, None) if seg is None else seg
        return gpu_bwd.backward_dkv(
            q, k, v, do, lse, delta, *segs, offset, kv_len, bmap_t, cfg, interpret
        )


def kernels(backend: str):
    """The kernel adapter of a backend: ``"tpu"`` or ``"gpu"``."""
    return {"tpu": _TpuKernels, "gpu": _GpuKernels}[backend]


def _pad_to(x, axis, length, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _layout(bq, bkv, q_BTNH, k_BSKH, v_BSKV, segs, kv_lengths):
    """Head-major operands padded to multiples of (bq, bkv), and the padded lengths."""
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    Tp, Sp = _round_up(T, bq), _round_up(S, bkv)
    q = _pad_to(q_BTNH.transpose(0, 2, 1, 3), 2, Tp)
    k = _pad_to(k_BSKH.transpose(0, 2, 1, 3), 2, Sp)
    v = _pad_to(v_BSKV.transpose(0, 2, 1, 3), 2, Sp)
    seg = None
    if segs is not None:
        seg = (_pad_to(segs[0], 1, Tp), _pad_to(segs[1], 1, Sp))
    B = q_BTNH.shape[0]
    if kv_lengths is None:
        kv_len = jnp.full((B,), S, jnp.int32)
    else:
        kv_len = jnp.clip(kv_lengths, 0, S)
    return q, k, v, seg, kv_len, Tp, Sp


def _round_up(x, m):
    return -(-x // m) * m


def _map(st, T, S, bq, bkv, off, kv_lengths, visits, transpose=False):
    return block_tables.build(
        st.mask,
        q_len=T,
        kv_len=S,
        block_q=bq,
        block_kv=bkv,
        q_offset=st.q_offset if off is None else off,
        kv_lengths=kv_lengths,
        visits=visits,
        per_batch=True,
        transpose=transpose,
        leaf_bits=True,
    )


def _forward(st, q_BTNH, k_BSKH, v_BSKV, segs, off, kv_lengths, visits):
    B, T, N, _ = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    bq, bkv = st.blocks[:2]
    q, k, v, seg, kv_len, Tp, Sp = _layout(bq, bkv, q_BTNH, k_BSKH, v_BSKV, segs, kv_lengths)
    bmap = _map(st, T, S, bq, bkv, off, kv_lengths, visits)
    ker = kernels(st.backend)
    cfg = ker.config(st, N // K, bq, bkv, seg is not None)
    offset = st.q_offset if off is None else off
    o_BNTV, lse_BNT = ker.forward(q, k, v, seg, offset, kv_len, bmap, cfg, st.interpret)
    o_BTNV = o_BNTV[:, :, :T].transpose(0, 2, 1, 3)
    return o_BTNV, lse_BNT[:, :, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash(st, q_BTNH, k_BSKH, v_BSKV, segs, off, kv_lengths, visits=()):
    """o_BTNV (and lse_BNT if ``st.return_lse``); see api.flash_attention."""
    o_BTNV, lse_BNT = _forward(st, q_BTNH, k_BSKH, v_BSKV, segs, off, kv_lengths, visits)
    return (o_BTNV, lse_BNT) if st.return_lse else o_BTNV


def _flash_fwd(st, q_BTNH, k_BSKH, v_BSKV, segs, off, kv_lengths, visits=()):
    o_BTNV, lse_BNT = _forward(st, q_BTNH, k_BSKH, v_BSKV, segs, off, kv_lengths, visits)
    res = (q_BTNH, k_BSKH, v_BSKV, segs, off, kv_lengths, visits, o_BTNV, lse_BNT)
    return ((o_BTNV, lse_BNT) if st.return_lse else o_BTNV), res


def _flash_bwd(st, res, cts):
    q_BTNH, k_BSKH, v_BSKV, segs, off, kv_lengths, visits, o_BTNV, lse_BNT = res
    do_BTNV, dlse_BNT = cts if st.return_lse else (cts, None)
    B, T, N, _ = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    bq, bkv = st.blocks[2:]
    q, k, v, seg, kv_len, Tp, Sp = _layout(bq, bkv, q_BTNH, k_BSKH, v_BSKV, segs, kv_lengths)
    # delta = rowsum(dO * O) - dlse in fp32; padded rows get dO = 0 and delta = 0.
    delta_BNT = jnp.einsum(
        "btnv,btnv->bnt", do_BTNV.astype(jnp.float32), o_BTNV.astype(jnp.float32)
    )
    if dlse_BNT is not None:
        delta_BNT = delta_BNT - dlse_BNT.astype(jnp.float32)
    delta_BNT = _pad_to(delta_BNT, 2, Tp)
    do = _pad_to(do_BTNV.astype(q.dtype).transpose(0, 2, 1, 3), 2, Tp)
    # Rows with no visible key have lse = -inf; +inf makes exp(s - lse) = 0 there, not NaN.
    # Padded rows get +inf too (their dO and delta are 0 anyway).
    lse_BNT = _pad_to(jnp.where(lse_BNT == -jnp.inf, jnp.inf, lse_BNT), 2, Tp, jnp.inf)
    offset = st.q_offset if off is None else off
    ker = kernels(st.backend)
    cfg = ker.config(st, N // K, bq, bkv, seg is not None)
    bmap = _map(st, T, S, bq, bkv, off, kv_lengths, visits)
    args = (q, k, v, do, lse_BNT, delta_BNT, seg, offset, kv_len)
    dq = ker.dq(*args, bmap, cfg, st.interpret)
    bmap_t = _map(st, T, S, bq, bkv, off, kv_lengths, visits, transpose=True)
    dk, dv = ker.dkv(*args, bmap_t, cfg, st.interpret)
    dq_BTNH = dq[:, :, :T].transpose(0, 2, 1, 3)
    dk_BSKH = dk[:, :, :S].transpose(0, 2, 1, 3)
    dv_BSKV = dv[:, :, :S].transpose(0, 2, 1, 3)
    zeros = jax.tree.map(lambda _: None, (segs, off, kv_lengths, visits))
    return (dq_BTNH, dk_BSKH, dv_BSKV, *zeros)


flash.defvjp(_flash_fwd, _flash_bwd)
