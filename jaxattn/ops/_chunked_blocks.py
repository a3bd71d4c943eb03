"""Block plumbing of the "chunked" implementation: head-folded matmuls, and reading kv blocks
(and adding gradients into them) by one dynamic slice or a gather per batch row and kv head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxattn.ops._attention_args import AttentionArgs
from jaxattn.ops._attention_math import precision

__all__ = ["Blocks"]


def _fold(x):
    """[B, K, G, t, ...] -> [B, K, G·t, ...] (a free reshape): the G query heads of a kv
    group become rows of one matmul. Keeping G as its own axis made XLA:CPU lay out the
    common G = 1 (MLA, MHA) with the unit axis in the middle and materialise transposing
    copies of every [B, K, 1, t, s] probability block (measured on the MLA training step)."""
    return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])


def _dot(spec, x, y):
    """``einsum(spec, x, y)`` in fp32, with operands and result laid out "bkgt..." folded to
    rows "bkr..." for the matmul (see ``_fold``)."""
    ins, out = spec.split("->")
    specs, args = [], []
    for sub, arg in zip(ins.split(","), (x, y)):
        if sub.startswith("bkgt"):
            sub, G, t, arg = "bkr" + sub[4:], arg.shape[2], arg.shape[3], _fold(arg)
        specs.append(sub)
        args.append(arg)
    fold_out = out.startswith("bkgt")
    r = jnp.einsum(
        f"{','.join(specs)}->{'bkr' + out[4:] if fold_out else out}",
        *args,
        preferred_element_type=jnp.float32,
        precision=precision(x.dtype),
    )
    return r.reshape(r.shape[0], r.shape[1], G, t, *r.shape[3:]) if fold_out else r


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


class Blocks:
    """Reads kv blocks and adds gradients into them.

    Shared tables (kb a scalar): one dynamic slice of every batch row and head. Per-row tables
    (kb [Rb, Rk]): a gather of block kb[b, k] per (batch row, kv head), and a scatter-add back.
    Values are read per "value group": the K_v value heads, or, when per-head lists meet
    K_v != K, the lcm(K, K_v) groups that each read one key head's list and one value head.
    """

    def __init__(self, a: AttentionArgs, bk: int, k, v, tables):
        B, K, Sp, _ = k.shape
        self.a, self.bk, self.nk = a, bk, Sp // bk
        self.per_row = tables is not None and tables.shape[:2] != (1, 1)
        rk = tables.shape[1] if self.per_row else 1
        P = a.Kv if rk == 1 or a.Kv == K else math.lcm(K, a.Kv)
        self.P = P
        self.v_head = jnp.arange(P) // (P // a.Kv)  # value head of each value group
        self.k_head = jnp.arange(P) // (P // K) if rk > 1 else jnp.zeros(P, jnp.int32)
        self.bi = jnp.arange(B)[:, None]

    def k_idx(self, kb):
        """Key indices of block kb: [bk], or [Rb, Rk, bk] per row."""
        kb = kb[..., None] if self.per_row else kb
        return kb * self.bk + jnp.arange(self.bk, dtype=jnp.int32)

    def _blocked(self, x):
        return x.reshape(x.shape[0], x.shape[1], self.nk, self.bk, x.shape[-1])

    def _where(self, kb, heads, key_heads):
        B = self.bi.shape[0]
        kb = jnp.broadcast_to(kb, (B, kb.shape[1]))
        return self.bi, heads[None, :], kb[:, key_heads]

    def read(self, k, v, kb, valid):
        """(k_blk [B, K, bk, H], v_blk [B, P, bk, V]).

        Per-row tables: rows whose list is over (``valid`` False) get zero blocks, so that
        whatever the repeated block holds (an empty list repeats block 0, which it does not
        list: possibly garbage or NaN) never enters their products.
        """
        if not self.per_row:
            return _slice(k, kb * self.bk, self.bk, 2), _slice(v, kb * self.bk, self.bk, 2)
        B, K = k.shape[:2]
        kk = jnp.arange(K)
        k_of = kk if kb.shape[1] > 1 else kk * 0
        k_blk = self._blocked(k)[self._where(kb, kk, k_of)]
        v_blk = self._blocked(v)[self._where(kb, self.v_head, self.k_head)]
        ok = jnp.broadcast_to(valid, (B, valid.shape[1]))
        k_blk = jnp.where(ok[:, k_of, None, None], k_blk, 0)
        v_blk = jnp.where(ok[:, self.k_head, None, None], v_blk, 0)
        return k_blk, v_blk

    def add(self, dk, dv, kb, dk_blk, dv_blk):
        """dk, dv with the block gradients added at block kb."""
        if not self.per_row:
            start = kb * self.bk
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, _slice(dk, start, self.bk, 2) + dk_blk, start, axis=2
            )
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, _slice(dv, start, self.bk, 2) + dv_blk, start, axis=2
            )
            return dk, dv
        kk = jnp.arange(dk.shape[1])
        at_k = self._blocked(dk).at[self._where(kb, kk, kk if kb.shape[1] > 1 else kk * 0)]
        at_v = self._blocked(dv).at[self._where(kb, self.v_head, self.k_head)]
        return at_k.add(dk_blk).reshape(dk.shape), at_v.add(dv_blk).reshape(dv.shape)
