"""HyperAttention (Han et al. 2023, arXiv 2310.05869), non-causal form, on the attention op.

Large entries of the attention matrix are found by sortLSH: queries and keys are hashed by
``num_planes`` random hyperplanes (angular LSH; 2^r buckets, ordered by Gray code so that
neighbouring buckets are close) and sorted by bucket; exact attention runs on the diagonal
blocks of ``block`` sorted queries x ``block`` sorted keys (a static block-diagonal
``BlockSparse``). The rest of each row is estimated from ``num_samples`` key columns sampled
uniformly without replacement, each outside the row's diagonal block weighted by S / m:

  num_i = e^{lse_blk,i} o_blk,i + (S/m) Σ_{j∈samples, j∉blk(i)} e^{s_ij} v_j
  den_i = e^{lse_blk,i}         + (S/m) Σ_{j∈samples, j∉blk(i)} e^{s_ij},   o_i = num_i / den_i

With one bucket (r = 0) and all S columns sampled the estimate is exact softmax attention.
The causal variant (the paper's recursion over halves) is not implemented here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import BlockSparse
from jaxattn.ops.attention import dot_product_attention

__all__ = ["lsh_buckets", "hyper_attention"]


def _gray_rank(num_planes):
    """rank[code]: position of a hyperplane-sign code in Gray-code order."""
    n = 1 << num_planes
    gray = np.arange(n) ^ (np.arange(n) >> 1)
    rank = np.empty(n, np.int32)
    rank[gray] = np.arange(n)
    return rank


def lsh_buckets(x_BTH, planes_HR):
    """Bucket ranks [B, T] of vectors x under hyperplanes [H, r] (Gray-code order)."""
    r = planes_HR.shape[-1]
    bits = (jnp.einsum("bth,hr->btr", x_BTH, planes_HR) > 0).astype(jnp.int32)
    code = jnp.sum(bits << jnp.arange(r, dtype=jnp.int32), axis=-1)
    return jnp.asarray(_gray_rank(r))[code]


def hyper_attention(
    q_BTNH,
    k_BTNH,
    v_BTNV,
    key,
    *,
    num_planes: int,
    block: int,
    num_samples: int,
    implementation="auto",
):
    """Approximate softmax attention (module docstring), one head group per query head (K = N).

    Args:
      key: jax.random key for the hyperplanes and the column samples.
      num_planes: r (0: one bucket); block: diagonal block size (divides T and S, T == S);
      num_samples: m sampled key columns, in [0, S].

    Raises:
      ValueError: K != N, T != S, block not dividing T, num_samples outside [0, S].
    """
    B, T, N, H = q_BTNH.shape
    S = k_BTNH.shape[1]
    if k_BTNH.shape[2] != N or T != S:
        raise ValueError(
            f"hyper_attention needs K = N and T = S, got q {q_BTNH.shape}, k {k_BTNH.shape}"
        )
    if T % block:
        raise ValueError(f"block={block} must divide T={T}")
    if not 0 <= num_samples <= S:
        raise ValueError(f"num_samples={num_samples} must be in [0, S={S}]")
    kp, ks = jax.random.split(key)
    planes = jax.random.normal(kp, (H, num_planes))
    scale = 1.0 / np.sqrt(H)
    # sortLSH per head: heads fold into the batch
    fold = lambda x: x.transpose(0, 2, 1, 3).reshape(B * N, T, -1)  # noqa: E731
    q, k, v = fold(q_BTNH), fold(k_BTNH), fold(v_BTNV)
    qo = jnp.argsort(lsh_buckets(q, planes), axis=1, stable=True)
    ko = jnp.argsort(lsh_buckets(k, planes), axis=1, stable=True)
    take = lambda x, o: jnp.take_along_axis(x, o[..., None], axis=1)  # noqa: E731
    qs, kss, vs = take(q, qo), take(k, ko), take(v, ko)
    nb = T // block
    diag = BlockSparse(layout=np.eye(nb, dtype=bool), block_q=block, block_kv=block)
    o_blk, lse_blk = dot_product_attention(
        qs[:, :, None],
        kss[:, :, None],
        vs[:, :, None],
        mask=diag,
        return_lse=True,
        implementation=implementation,
    )
    o_blk, lse_blk = o_blk[:, :, 0].astype(jnp.float32), lse_blk[:, 0]  # [BN, T, V], [BN, T]
    if num_samples:
        cols = jax.vmap(lambda kk: jax.random.permutation(kk, S)[:num_samples])(
            jax.random.split(ks, B * N)
        )  # [BN, m] positions in the sorted key order
        kc, vc = take(kss, cols), take(vs, cols)
        s = jnp.einsum("bth,bmh->btm", qs.astype(jnp.float32), kc.astype(jnp.float32)) * scale
        outside = (jnp.arange(T)[None, :, None] // block) != (cols[:, None, :] // block)
        s = jnp.where(outside, s, -jnp.inf) + jnp.log(S / num_samples)
        lse_s = jax.nn.logsumexp(s, axis=-1)
        o_s = jnp.einsum(
            "btm,bmv->btv",
            jnp.exp(s - jnp.where(jnp.isneginf(lse_s), 0.0, lse_s)[..., None]),
            vc.astype(jnp.float32),
        )
        lse = jnp.logaddexp(lse_blk, lse_s)
        o_blk = jnp.exp(lse_blk - lse)[..., None] * o_blk + jnp.exp(lse_s - lse)[..., None] * o_s
    inv = jnp.argsort(qo, axis=1)
    o = take(o_blk, inv).reshape(B, N, T, -1).transpose(0, 2, 1, 3)
    return o.astype(q_BTNH.dtype)
