"""Native Sparse Attention (NSA, arXiv 2502.11089; FSA loop order): the ``"nsa"`` kind.

GQA attention whose op is :func:`jaxattn.ops.nsa.nsa_attention`: a compressed branch
(learned block compression of the keys and values), a selected branch (the top-n key blocks
per token and kv head, chosen from the compressed attention probabilities, attended through
per-token block-visit lists) and a sliding window, mixed per head by sigmoid gates computed
from the token (``gate``: [D] -> [N, 3]). Everything else (projections, RoPE, qk-norm, GQA)
is the ``"mha"`` kind's. Parameters added: ``gate``, ``k_compress`` / ``v_compress``
([l, H] -> H, one per layer, shared by the kv heads) and the intra-block position embeddings
``k_block_pos`` / ``v_block_pos`` [l, H].

Decoding stores keys and values in a full dense ``KVCache`` and recomputes NSA for the new
queries over the stored positions (the compressed keys are recomputed from the stored keys
each step: O(C) per step; a cache that keeps compressed keys is not written). Packed
sequences (``ctx.segment_ids_BT``) and attention dropout are not supported (refused).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers import _validate as val
from jaxattn.layers._attention import Attention, AttentionConfig
from jaxattn.layers._context import Context
from jaxattn.layers._kinds import register_kind
from jaxattn.layers._linear import Linear
from jaxattn.ops import nsa

__all__ = ["NSAConfig", "NativeSparseAttention"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NSAConfig(AttentionConfig):
    """:class:`AttentionConfig` plus NSA's branch sizes (the ``"nsa"`` kind).

    Attributes:
      cmp_block: l, keys per compressed block (paper 32).
      cmp_stride: d, stride between compressed blocks (paper 16); divides cmp_block.
      sel_block: l', keys per selection block (paper 64).
      top_n: n, selected blocks per token and kv head (paper 16), including the first block
        and the two local ones; a sequence with fewer blocks attends to all of them.
      window: w, keys of the sliding-window branch (paper 512).
    """

    kind: ClassVar[str] = "nsa"

    cmp_block: int = 32
    cmp_stride: int = 16
    sel_block: int = 64
    top_n: int = 16
    window: int = 512

    def __post_init__(self):
        super().__post_init__()
        o = type(self).__name__
        for name in ("cmp_block", "cmp_stride", "sel_block", "top_n", "window"):
            val.check_int(o, name, getattr(self, name))
        if self.cmp_block % self.cmp_stride:
            raise ValueError(
                f"{o}: cmp_stride={self.cmp_stride} must divide cmp_block={self.cmp_block}"
            )
        if self.top_n < 3:
            raise ValueError(f"{o}: top_n={self.top_n} must be >= 3 (first + two local blocks)")
        if self.sliding_window is not None or self.dropout or self.n_v != self.n_kv:
            raise ValueError(
                f"{o}: sliding_window, dropout and num_v_heads are not NSA options (the "
                "window branch is `window`)"
            )
        if self.cache is not None and self.cache.policy != "full":
            raise ValueError(f"{o}: cache.policy={self.cache.policy!r}: NSA needs a full cache")

    def build(self, *, rngs: nnx.Rngs) -> NativeSparseAttention:
        """The :class:`NativeSparseAttention` module of this config."""
        return NativeSparseAttention(self, rngs=rngs)

    @property
    def branch_sizes(self) -> dict:
        """Keyword arguments of ``nsa.nsa_attention``."""
        return dict(
            block=self.cmp_block,
            stride=self.cmp_stride,
            sel_block=self.sel_block,
            top_n=self.top_n,
            window=self.window,
        )


register_kind("nsa", NSAConfig)


class NativeSparseAttention(Attention):
    """GQA attention with NSA's three gated branches (the ``"nsa"`` kind; module docstring)."""

    def __init__(self, config: NSAConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        c = config
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.gate = Linear((c.d_model,), (c.n_q, 3), axes=("embed", "heads", None), **common)
        for name, width in (("k", c.h), ("v", c.v)):
            lin = Linear((c.cmp_block, width), (width,), axes=(None, "head_dim", None), **common)
            setattr(self, f"{name}_compress", lin)
            pos = jnp.zeros((c.cmp_block, width), c.param_dtype)
            setattr(self, f"{name}_block_pos", nnx.Param(pos))

    def project(self, x_BTD: jax.Array, ctx: Context):
        """q_BTNH and (k_BTKH, v_BTKV, gates_BTN3): the gates are sigmoid(W_g x)."""
        q, (k, v) = super().project(x_BTD, ctx)
        return q, (k, v, jax.nn.sigmoid(self.gate(x_BTD, ctx).astype(jnp.float32)))

    def qk_transform(self, q_BTNH, kv, ctx: Context):
        q, (k, v) = super().qk_transform(q_BTNH, kv[:2], ctx)
        return q, (k, v, kv[2])

    def compressed(self, k_BSKH, v_BSKV, ctx: Context):
        """(k_cmp, v_cmp) [B, nc, K, .] of keys/values at positions 0..S-1."""
        c = self.config
        kw = dict(block=c.cmp_block, stride=c.cmp_stride)
        phi_k = lambda x: self.k_compress(x, ctx)  # noqa: E731
        phi_v = lambda x: self.v_compress(x, ctx)  # noqa: E731
        return (
            nsa.compress(k_BSKH, phi_k, self.k_block_pos[...], **kw),
            nsa.compress(v_BSKV, phi_v, self.v_block_pos[...], **kw),
        )

    def _nsa(self, q, k, v, gates, ctx, q_offset):
        c = self.config
        k_cmp, v_cmp = self.compressed(k, v, ctx)
        return nsa.nsa_attention(
            q,
            k,
            v,
            gates,
            k_cmp,
            v_cmp,
            q_offset=q_offset,
            scale=c.softmax_scale,
            implementation=c.implementation,
            **c.branch_sizes,
        )

    def attend(self, q_BTNH, kv, ctx: Context) -> jax.Array:
        """NSA over the sequence itself."""
        if ctx.segment_ids_BT is not None:
            raise NotImplementedError("the 'nsa' kind does not serve packed segments")
        k, v, gates = kv
        return self._nsa(q_BTNH, k, v, gates, ctx, 0)

    def attention_inputs(self, q, kv, ctx: Context):
        raise NotImplementedError("the 'nsa' kind has no single attention op for hooks")

    def attend_cache(self, q_BTNH, kv, cache, ctx: Context, *, num_new_B=None):
        """Store the new keys/values, then NSA of the new queries over every stored position."""
        k, v, gates = kv
        start_B = cache.lengths_B
        cache = cache.write(k.astype(cache.k_BCKH.dtype), v.astype(cache.v_BCKV.dtype), num_new_B)
        dt = cache.k_BCKH.dtype
        o = self._nsa(q_BTNH.astype(dt), cache.k_BCKH, cache.v_BCKV, gates, ctx, start_B)
        t = q_BTNH.shape[1]
        return o.astype(q_BTNH.dtype), cache.advance(t if num_new_B is None else num_new_B)
