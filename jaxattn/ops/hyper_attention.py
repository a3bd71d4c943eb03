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

Causal form (``causal_hyper_attention``, the paper's Algorithm 4): the causal mask of a length
n sequence splits into two causal diagonal blocks of length n/2 (queries and keys 1..n/2, and
n/2+1..n), each computed recursively, and the unmasked off-diagonal block (queries n/2+1..n
over keys 1..n/2), estimated by the non-causal HyperAttention above. At n <= ``min_seq_len``
the causal block is exact. The parts of a row merge by their log-sum-exps (the paper's
normalizers D), so with one bucket and full sampling at every level it is exact causal
attention, and no query reads a later key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import BlockSparse, Causal
from jaxattn.ops.attention import dot_product_attention

__all__ = ["lsh_buckets", "hyper_attention", "causal_hyper_attention"]


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


def _fold(x_BTNH):
    """[B, T, N, H] -> [B * N, T, H]: heads fold into the batch."""
    B, T, N, H = x_BTNH.shape
    return x_BTNH.transpose(0, 2, 1, 3).reshape(B * N, T, H)


def _unfold(x, B, N):
    return x.reshape(B, N, *x.shape[1:]).transpose(0, 2, 1, 3)


def _take(x, o):
    return jnp.take_along_axis(x, o[..., None], axis=1)


def _hyper_folded(q, k, v, key, num_planes, block, num_samples, implementation):
    """Non-causal HyperAttention on folded heads q, k [BN, T, H], v [BN, T, V] (T == S):
    o [BN, T, V] float32 and the estimated log-normalizer lse [BN, T] (log den_i)."""
    BN, T, H = q.shape
    S = k.shape[1]
    kp, ks = jax.random.split(key)
    planes = jax.random.normal(kp, (H, num_planes))
    scale = 1.0 / np.sqrt(H)
    qo = jnp.argsort(lsh_buckets(q, planes), axis=1, stable=True)
    ko = jnp.argsort(lsh_buckets(k, planes), axis=1, stable=True)
    qs, kss, vs = _take(q, qo), _take(k, ko), _take(v, ko)
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
    o_blk, lse = o_blk[:, :, 0].astype(jnp.float32), lse_blk[:, 0]  # [BN, T, V], [BN, T]
    if num_samples:
        cols = jax.vmap(lambda kk: jax.random.permutation(kk, S)[:num_samples])(
            jax.random.split(ks, BN)
        )  # [BN, m] positions in the sorted key order
        kc, vc = _take(kss, cols), _take(vs, cols)
        s = jnp.einsum("bth,bmh->btm", qs.astype(jnp.float32), kc.astype(jnp.float32)) * scale
        outside = (jnp.arange(T)[None, :, None] // block) != (cols[:, None, :] // block)
        s = jnp.where(outside, s, -jnp.inf) + jnp.log(S / num_samples)
        lse_s = jax.nn.logsumexp(s, axis=-1)
        o_s = jnp.einsum(
            "btm,bmv->btv",
            jnp.exp(s - jnp.where(jnp.isneginf(lse_s), 0.0, lse_s)[..., None]),
            vc.astype(jnp.float32),
        )
        lse_all = jnp.logaddexp(lse, lse_s)
        o_blk = (
            jnp.exp(lse - lse_all)[..., None] * o_blk + jnp.exp(lse_s - lse_all)[..., None] * o_s
        )
        lse = lse_all
    inv = jnp.argsort(qo, axis=1)
    return _take(o_blk, inv), jnp.take_along_axis(lse, inv, axis=1)


def _check_qkv(name, q_BTNH, k_BTNH, num_samples):
    N, T, S = q_BTNH.shape[2], q_BTNH.shape[1], k_BTNH.shape[1]
    if k_BTNH.shape[2] != N or T != S:
        raise ValueError(f"{name} needs K = N and T = S, got q {q_BTNH.shape}, k {k_BTNH.shape}")
    if not 0 <= num_samples <= S:
        raise ValueError(f"num_samples={num_samples} must be in [0, S={S}]")


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
    _check_qkv("hyper_attention", q_BTNH, k_BTNH, num_samples)
    if T % block:
        raise ValueError(f"block={block} must divide T={T}")
    o, _ = _hyper_folded(
        _fold(q_BTNH),
        _fold(k_BTNH),
        _fold(v_BTNV),
        key,
        num_planes,
        block,
        num_samples,
        implementation,
    )
    return _unfold(o, B, N).astype(q_BTNH.dtype)


def causal_hyper_attention(
    q_BTNH,
    k_BTNH,
    v_BTNV,
    key,
    *,
    num_planes: int,
    block: int,
    num_samples: int,
    min_seq_len: int,
    implementation="auto",
):
    """Causal HyperAttention (module docstring, Algorithm 4), K = N, T = S.

    Args:
      key: jax.random key; each level of the recursion draws from its own split of it (the
        blocks of a level are one batched call and share its hyperplanes, as heads do).
      num_planes, block, num_samples: the non-causal estimate's (off-diagonal blocks of
        length L use block min(block, L) and min(num_samples, L) sampled columns).
      min_seq_len: diagonal blocks of at most this length are exact causal attention.

    Raises:
      ValueError: K != N, T != S, num_samples outside [0, T], min_seq_len < 1, a level of
        the recursion whose length is odd or whose half the block does not divide.
    """
    B, T, N, H = q_BTNH.shape
    _check_qkv("causal_hyper_attention", q_BTNH, k_BTNH, num_samples)
    if min_seq_len < 1:
        raise ValueError(f"min_seq_len={min_seq_len} must be >= 1")
    n = T
    while n > min_seq_len:
        if n % 2 or (n // 2) % min(block, n // 2):
            raise ValueError(
                f"block={block} and min_seq_len={min_seq_len}: the recursion halves T={T} down "
                f"to <= min_seq_len, and the length {n} is odd or its half is not a multiple "
                f"of the block"
            )
        n //= 2

    def rec(q, k, v, key):
        n = q.shape[1]
        if n <= min_seq_len:
            o, lse = dot_product_attention(
                q[:, :, None],
                k[:, :, None],
                v[:, :, None],
                mask=Causal(),
                return_lse=True,
                implementation=implementation,
            )
            return o[:, :, 0].astype(jnp.float32), lse[:, 0]
        h = n // 2
        kd, ko = jax.random.split(key)
        # both causal halves in one call (one trace per level, not per block): they fold
        # into the batch axis, [BN, n, .] -> [BN * 2, h, .], and share the level's draws
        BN = q.shape[0]
        halves = lambda x: x.reshape(BN * 2, h, x.shape[-1])  # noqa: E731
        od, ld = rec(halves(q), halves(k), halves(v), kd)
        od, ld = od.reshape(BN, 2, h, -1), ld.reshape(BN, 2, h)
        o11, o22, l11, l22 = od[:, 0], od[:, 1], ld[:, 0], ld[:, 1]
        o21, l21 = _hyper_folded(
            q[:, h:],
            k[:, :h],
            v[:, :h],
            ko,
            num_planes,
            min(block, h),
            min(num_samples, h),
            implementation,
        )
        l2 = jnp.logaddexp(l22, l21)
        o2 = jnp.exp(l22 - l2)[..., None] * o22 + jnp.exp(l21 - l2)[..., None] * o21
        return jnp.concatenate([o11, o2], axis=1), jnp.concatenate([l11, l2], axis=1)

    o, _ = rec(_fold(q_BTNH), _fold(k_BTNH), _fold(v_BTNV), key)
    return _unfold(o, B, N).astype(q_BTNH.dtype)
