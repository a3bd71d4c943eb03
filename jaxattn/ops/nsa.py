"""Native Sparse Attention (NSA, Yuan et al. 2025, arXiv 2502.11089) on the block-visit op.

Three branches per query token t (position p) and query head n (kv head k = n // G), mixed by
learned per-head gates g ∈ (0, 1)^3 (paper eq. 5):

    o_t = g_cmp · Attn(q_t, K_cmp, V_cmp) + g_slc · Attn(q_t, K_slc(t), V_slc(t))
          + g_win · Attn(q_t, K[p-w+1 .. p], V[p-w+1 .. p])

* compression (eq. 7): compressed block i summarises keys [i·d, i·d + l) (block l, stride d):
  K_cmp[i] = φ_k(K[i·d : i·d + l] + E_k), with φ a learned linear map of the whole block
  ([l, H] -> H, per kv head shared) and E an intra-block position embedding; likewise V. Query
  position p sees compressed block i when the block lies in its past: i·d + l - 1 <= p.
* selection (eq. 8-10): importance of selection block j (keys [j·l', (j+1)·l')) for token t
  and kv head k: the compressed-attention probabilities of t, summed over the G heads of the
  group (GQA-shared selection) and over the compressed blocks that overlap block j (the
  overlap form of eq. 9); the top-n blocks among those starting at or before p are kept, the
  first block and the two local blocks (p // l' and the one before) always. Selection is not
  differentiated (as in the paper: gradients reach the gates and the compression through the
  other terms).
* sliding window (w keys: p - w < j <= p).

Fast path (:func:`nsa_attention`): three calls of ``dot_product_attention``: the compressed
branch over the nc compressed keys (a dense [T, nc] visibility mask), the selected branch with
per-token ``BlockVisits`` (block_q = 1, block_kv = l': the kv-major FSA loop of "chunked"),
and the window branch with ``SlidingWindow``; the importance scores are recomputed from the
compressed branch's LSE in query chunks (memory O(chunk · nc)).
Reference (:func:`nsa_reference`): a naive gather-based form: per token, gather the selected
blocks' keys, and plain softmaxes over explicit masks.

Differences from the paper: the three branches share one key/value projection (the paper
gives each its own); φ is one linear layer (the paper's MLP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks import BlockVisits, Causal, SlidingWindow
from jaxattn.ops.attention import dot_product_attention

__all__ = [
    "num_compressed",
    "compress",
    "compressed_visible",
    "selection_scores",
    "select_blocks",
    "nsa_attention",
    "nsa_reference",
]

_SCORE_CHUNK = 1024  # query rows per chunk of the importance scores


def num_compressed(S: int, block: int, stride: int) -> int:
    """nc = number of compressed blocks of S keys: floor((S - l) / d) + 1, 0 when S < l."""
    return 0 if S < block else (S - block) // stride + 1


def compress(x_BSKH, phi, pos_LH, *, block: int, stride: int):
    """φ(x[i·d : i·d + l] + E) for every compressed block (eq. 7): [B, nc, K, O].

    Args:
      x_BSKH: keys or values [B, S, K, H].
      phi: the learned map [..., l, H] -> [..., O] (a ``Linear``, or any function).
      pos_LH: intra-block position embedding E [l, H].
    """
    B, S, K, H = x_BSKH.shape
    nc = num_compressed(S, block, stride)
    idx = np.arange(max(nc, 1))[:, None] * stride + np.arange(block)[None]  # [nc, l]
    idx = np.minimum(idx, max(S - 1, 0))
    blocks = x_BSKH[:, idx].transpose(0, 1, 3, 2, 4)  # [B, nc, K, l, H]
    out = phi(blocks + pos_LH.astype(x_BSKH.dtype))
    return out[:, :nc]


def compressed_visible(q_pos_BT, nc: int, *, block: int, stride: int):
    """bool [B, T, nc]: compressed block i is visible from position p when i·d + l - 1 <= p."""
    end = jnp.arange(nc, dtype=jnp.int32) * stride + block - 1
    return end[None, None, :] <= q_pos_BT[:, :, None]


def _overlap_sum(p_cmp, nsel: int, *, block: int, stride: int, sel_block: int):
    """Σ over the compressed blocks i that overlap selection block j: [..., nc] -> [..., nsel].

    Block i covers [i·d, i·d + l) and block j [j·l', (j+1)·l'): they overlap for
    ceil((j·l' - l + 1) / d) <= i <= floor(((j+1)·l' - 1) / d); a prefix sum gives each range.
    """
    nc = p_cmp.shape[-1]
    j = np.arange(nsel)
    lo = np.clip(-(-(j * sel_block - block + 1) // stride), 0, nc)
    hi = np.clip(((j + 1) * sel_block - 1) // stride + 1, 0, nc)
    cum = jnp.pad(jnp.cumsum(p_cmp, axis=-1), [(0, 0)] * (p_cmp.ndim - 1) + [(1, 0)])
    return cum[..., hi] - cum[..., lo]


def select_blocks(scores_BTKJ, q_pos_BT, *, top_n: int, sel_block: int):
    """Top-n selection blocks per (token, kv head): (indices int32 [B, K, T, n], counts [B, K, T]).

    Blocks starting after the token (j·l' > p) are unavailable; block 0 and the local blocks
    p // l' and p // l' - 1 are always selected; a token with fewer than n available blocks
    takes them all (count = min(n, p // l' + 1)).

    Raises:
      ValueError: top_n larger than the selection blocks of the sequence.
    """
    nsel = scores_BTKJ.shape[-1]
    if not 1 <= top_n <= nsel:
        raise ValueError(
            f"top_n={top_n} must be in [1, selection blocks={nsel}] (ceil(S / sel_block="
            f"{sel_block}))"
        )
    j = jnp.arange(nsel, dtype=jnp.int32)
    cur = (q_pos_BT // sel_block)[:, :, None, None]
    avail = j <= cur
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    s = jnp.where(forced, jnp.inf, scores_BTKJ)
    s = jnp.where(avail, s, -jnp.inf)
    _, idx = jax.lax.top_k(s, top_n)  # [B, T, K, n]
    counts = jnp.minimum(top_n, cur[..., 0, 0] + 1)  # [B, T]
    K = scores_BTKJ.shape[2]
    counts = jnp.broadcast_to(counts[:, None], (counts.shape[0], K, counts.shape[1]))
    return idx.transpose(0, 2, 1, 3).astype(jnp.int32), counts.astype(jnp.int32)


def selection_scores(
    q_BTNH, k_cmp_BCKH, lse_BNT, q_pos_BT, *, block, stride, sel_block, nsel, scale
):
    """Importance of each selection block [B, T, K, nsel] from the compressed-branch
    probabilities p_cmp = exp(q·k_cmp·scale - lse) (eq. 8), summed over each group's heads and
    over the compressed blocks overlapping a selection block (eq. 9, overlap form). No gradient.
    """
    B, T, N, H = q_BTNH.shape
    nc, K = k_cmp_BCKH.shape[1], k_cmp_BCKH.shape[2]
    G = N // K
    q, kc, lse = jax.lax.stop_gradient((q_BTNH, k_cmp_BCKH, lse_BNT))
    if nc == 0:
        return jnp.zeros((B, T, K, nsel), jnp.float32)

    def chunk(args):
        q_c, lse_c, pos_c = args  # [B, t, N, H], [B, N, t], [B, t]
        s = jnp.einsum(
            "btkgh,bckh->btkgc",
            q_c.reshape(B, -1, K, G, H),
            kc,
            preferred_element_type=jnp.float32,
        )
        lse_t = lse_c.reshape(B, K, G, -1).transpose(0, 3, 1, 2)[..., None]
        vis = compressed_visible(pos_c, nc, block=block, stride=stride)[:, :, None, None]
        p = jnp.where(vis & jnp.isfinite(lse_t), jnp.exp(s * scale - lse_t), 0.0).sum(3)
        return _overlap_sum(p, nsel, block=block, stride=stride, sel_block=sel_block)

    tc = min(T, _SCORE_CHUNK)
    nt = -(-T // tc)
    pad = nt * tc - T
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, nt, tc, N, H)
    lp = jnp.pad(lse, ((0, 0), (0, 0), (0, pad))).reshape(B, N, nt, tc)
    pp = jnp.pad(q_pos_BT, ((0, 0), (0, pad))).reshape(B, nt, tc)
    out = jax.lax.map(chunk, (qp.swapaxes(0, 1), lp.transpose(2, 0, 1, 3), pp.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(B, nt * tc, K, nsel)[:, :T]


def _check(q_BTNH, k_BSKH, v_BSKV, gates_BTN3):
    B, T, N, H = q_BTNH.shape
    if k_BSKH.ndim != 4 or v_BSKV.shape[:3] != k_BSKH.shape[:3] or N % k_BSKH.shape[2]:
        raise ValueError(
            f"nsa: k {k_BSKH.shape} and v {v_BSKV.shape} must be [B, S, K, .] with K dividing "
            f"q's heads {N}"
        )
    if gates_BTN3.shape != (B, T, N, 3):
        raise ValueError(f"nsa: gates must have shape {(B, T, N, 3)}, got {gates_BTN3.shape}")


def nsa_attention(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    gates_BTN3,
    k_cmp_BCKH,
    v_cmp_BCKV,
    *,
    block: int,
    stride: int,
    sel_block: int,
    top_n: int,
    window: int,
    q_offset=0,
    scale=None,
    implementation="auto",
):
    """NSA over keys 0..S-1 for queries at positions q_offset + t (module docstring).

    Args:
      q_BTNH: queries [B, T, N, H]; k_BSKH, v_BSKV: keys / values [B, S, K, H|V] (positions
        0..S-1; keys after a query's position are never seen, so a cache's unfilled tail is
        harmless).
      gates_BTN3: branch gates (compressed, selected, window) [B, T, N, 3], in (0, 1).
      k_cmp_BCKH, v_cmp_BCKV: compressed keys / values (``compress``) [B, nc, K, .].
      block, stride: compression block l and stride d; sel_block: l'; top_n: n; window: w.
      q_offset: int or int [B]: position of query row 0.
      scale: logit scale (default 1/sqrt(H)).
      implementation: of the three ``dot_product_attention`` calls.

    Returns:
      o_BTNV in q's dtype.
    """
    _check(q_BTNH, k_BSKH, v_BSKV, gates_BTN3)
    B, T, N, H = q_BTNH.shape
    S, nc = k_BSKH.shape[1], k_cmp_BCKH.shape[1]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    pos = off[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    op = dict(scale=scale, implementation=implementation)
    if nc:
        vis = compressed_visible(pos, nc, block=block, stride=stride)  # [B, T, nc]
        o_cmp, lse = dot_product_attention(
            q_BTNH, k_cmp_BCKH, v_cmp_BCKV, mask=vis, return_lse=True, **op
        )
    else:
        o_cmp = jnp.zeros((*q_BTNH.shape[:3], v_BSKV.shape[-1]), q_BTNH.dtype)
        lse = jnp.full((B, N, T), -jnp.inf)
    nsel = -(-S // sel_block)
    scores = selection_scores(
        q_BTNH,
        k_cmp_BCKH,
        lse,
        pos,
        block=block,
        stride=stride,
        sel_block=sel_block,
        nsel=nsel,
        scale=scale,
    )
    idx, cnt = select_blocks(scores, pos, top_n=min(top_n, nsel), sel_block=sel_block)
    visits = BlockVisits(indices=idx, counts=cnt, block_q=1, block_kv=sel_block)
    qo = off if not isinstance(q_offset, int) else q_offset
    o_slc = dot_product_attention(
        q_BTNH, k_BSKH, v_BSKV, mask=Causal(), q_offset=qo, block_visits=visits, **op
    )
    o_win = dot_product_attention(
        q_BTNH, k_BSKH, v_BSKV, mask=SlidingWindow(left=window - 1), q_offset=qo, **op
    )
    g = gates_BTN3.astype(jnp.float32)[..., None]
    o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
    return o.astype(q_BTNH.dtype)


def _softmax_attend(q_BTNH, k_BtSKH, v_BtSKV, vis_BTS, scale):
    """Plain softmax attention with per-query keys: k/v [B, T, s, K, .], vis [B, T, s] (or
    [B, T, N, s]); rows that see nothing give zeros."""
    B, T, N, H = q_BTNH.shape
    K = k_BtSKH.shape[3]
    q = q_BTNH.reshape(B, T, K, N // K, H).astype(jnp.float32)
    s = jnp.einsum("btkgh,btskh->btkgs", q, k_BtSKH.astype(jnp.float32)) * scale
    vis = vis_BTS[:, :, None, None] if vis_BTS.ndim == 3 else vis_BTS
    s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m))
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    o = jnp.einsum("btkgs,btskv->btkgv", p, v_BtSKV.astype(jnp.float32))
    return o.reshape(B, T, N, -1), s, p


def nsa_reference(
    q_BTNH,
    k_BSKH,
    v_BSKV,
    gates_BTN3,
    k_cmp_BCKH,
    v_cmp_BCKV,
    *,
    block,
    stride,
    sel_block,
    top_n,
    window,
    q_offset=0,
    scale=None,
):
    """Naive gather-based NSA (same arguments as :func:`nsa_attention`; no blocked kernels, no
    visit lists): per token, the selected blocks' keys are gathered and attended with an
    explicit causal mask; the compressed and window branches are explicit masked softmaxes;
    the importance scores are the compressed probabilities themselves, mapped to selection
    blocks by an explicit [nc, nsel] overlap matrix. Materialises [B, T, N, S]."""
    B, T, N, H = q_BTNH.shape
    S, nc, K = k_BSKH.shape[1], k_cmp_BCKH.shape[1], k_BSKH.shape[2]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    pos = off[:, None] + jnp.arange(T)[None]  # [B, T]
    bcast = lambda x: jnp.broadcast_to(x[:, None], (B, T, *x.shape[1:]))  # noqa: E731
    # compressed branch: every query against all nc compressed keys, explicit visibility
    ends = jnp.arange(nc) * stride + block - 1
    vis_c = ends[None, None] <= pos[..., None]
    o_cmp, _, p_cmp = _softmax_attend(q_BTNH, bcast(k_cmp_BCKH), bcast(v_cmp_BCKV), vis_c, scale)
    # importance: p_cmp summed over the group, times the explicit overlap matrix
    nsel = -(-S // sel_block)
    i, j = np.arange(nc)[:, None], np.arange(nsel)[None]
    overlap = (i * stride < (j + 1) * sel_block) & (i * stride + block > j * sel_block)
    imp = jnp.einsum(
        "btkgc,cj->btkj", jax.lax.stop_gradient(p_cmp), jnp.asarray(overlap, jnp.float32)
    )
    idx, cnt = select_blocks(imp, pos, top_n=min(top_n, nsel), sel_block=sel_block)
    # selected branch: gather each token's blocks of keys, mask the future and unused slots
    n = idx.shape[-1]
    key_idx = idx[..., None] * sel_block + jnp.arange(sel_block)  # [B, K, T, n, l']
    key_idx = key_idx.reshape(B, K, T, n * sel_block)
    ok = (jnp.arange(n)[:, None] < cnt[..., None, None]).reshape(B, K, T, n, 1)
    ok = jnp.broadcast_to(ok, (B, K, T, n, sel_block)).reshape(B, K, T, -1)
    ok &= (key_idx <= pos[:, None, :, None]) & (key_idx < S)
    safe = jnp.clip(key_idx, 0, S - 1)
    gather = lambda x: jnp.stack(  # noqa: E731
        [x[jnp.arange(B)[:, None, None], safe[:, kk], kk] for kk in range(K)], axis=3
    )  # [B, T, n·l', K, .]
    k_sel, v_sel = gather(k_BSKH), gather(v_BSKV)
    G = N // K
    vis_s = jnp.repeat(ok.transpose(0, 2, 1, 3)[:, :, :, None], G, axis=3)  # [B, T, K, G, s]
    o_slc, _, _ = _softmax_attend(q_BTNH, k_sel, v_sel, vis_s, scale)
    # window branch
    kpos = jnp.arange(S)[None, None]
    vis_w = (kpos <= pos[..., None]) & (kpos > pos[..., None] - window)
    o_win, _, _ = _softmax_attend(q_BTNH, bcast(k_BSKH), bcast(v_BSKV), vis_w, scale)
    g = gates_BTN3.astype(jnp.float32)[..., None]
    o = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
    return o.astype(q_BTNH.dtype)
