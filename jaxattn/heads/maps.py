"""Metrics and edits on attention maps ``p_BNTS`` (rows sum to 1 over visible keys).

WAAD / FAI (Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm, 2025), written
from PAPERS.md §10's description (†: the clipping and averaging conventions are ours):

    WAAD[t] = sum_s p[t, s] · min(t - s, W)             windowed average attention distance
    FAI[s]  = mean_{t > s} p[t, s]                       future attention influence (0 for the
                                                         last key, which no later row sees)

ACT (Unveiling and Harnessing Hidden Attention Sinks, Yu et al. 2024), on the fly per input: a
key s is a sink of head n when the mean attention it receives over the rows that see it
exceeds ``threshold`` (optionally sparing the first token, ACT's useful sink). Calibrated heads
keep ``beta`` of each sink's weight and hand the rest to the row's other keys in proportion to
their weight, so rows still sum to 1; other heads are unchanged.

Segment mass (ICR's per-document quantity): ``mass[b, n, t, d] = sum_{s in segment d} p``.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxattn.heads._hooks import Intervene, resolve_indices

__all__ = ["waad", "fai", "segment_mass", "find_sinks", "calibrate_sinks", "act_hook"]


def _check(p_BNTS, name="p_BNTS"):
    p = jnp.asarray(p_BNTS, jnp.float32)
    if p.ndim != 4:
        raise ValueError(f"{name} must be [B, N, T, S], got shape {p.shape}")
    return p


def waad(p_BNTS, window: int, q_offset: int = 0):
    """Windowed average attention distance [B, N, T] (distance clipped at ``window``).

    Args:
      p_BNTS: probabilities; row t is query position ``q_offset + t``, key s position s.
      window: the clip W >= 1.
    """
    p = _check(p_BNTS)
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    t = jnp.arange(p.shape[2])[:, None] + q_offset
    s = jnp.arange(p.shape[3])[None, :]
    dist_TS = jnp.clip(t - s, 0, window).astype(jnp.float32)
    return jnp.einsum("bnts,ts->bnt", p, dist_TS)


def fai(p_BNTS):
    """Future attention influence [B, N, S]: each key's mean weight from later rows (square
    causal maps, T = S; the last key, seen by no later row, gets 0)."""
    p = _check(p_BNTS)
    T, S = p.shape[2:]
    if T != S:
        raise ValueError(f"fai needs a square causal map, got T={T}, S={S}")
    later_TS = jnp.arange(T)[:, None] > jnp.arange(S)[None, :]
    count_S = jnp.sum(later_TS, axis=0)
    total_BNS = jnp.einsum("bnts,ts->bns", p, later_TS.astype(p.dtype))
    return jnp.where(count_S > 0, total_BNS / jnp.maximum(count_S, 1), 0.0)


def segment_mass(p_BNTS, segments_BdS):
    """Attention mass of each row on each segment: [B, N, T, d] (``segments_BdS`` bool)."""
    p = _check(p_BNTS)
    seg = jnp.asarray(segments_BdS)
    if seg.ndim != 3 or seg.shape[0] != p.shape[0] or seg.shape[2] != p.shape[3]:
        raise ValueError(
            f"segments_BdS must be [B={p.shape[0]}, d, S={p.shape[3]}], got {seg.shape}"
        )
    return jnp.einsum("bnts,bds->bntd", p, seg.astype(p.dtype))


def find_sinks(p_BNTS, threshold: float, *, keep_first: bool = True):
    """Sink keys [B, N, S] (bool): mean received weight over the rows that see the key (a
    nonzero column entry, or a causal square map's rows t >= s) above ``threshold``."""
    p = _check(p_BNTS)
    T, S = p.shape[2:]
    seen_TS = (jnp.arange(T)[:, None] + (S - T)) >= jnp.arange(S)[None, :]  # causal, end-aligned
    mean_BNS = jnp.einsum("bnts,ts->bns", p, seen_TS.astype(p.dtype)) / jnp.maximum(
        jnp.sum(seen_TS, axis=0), 1
    )
    sinks = mean_BNS > threshold
    if keep_first:
        sinks = sinks.at[..., 0].set(False)
    return sinks


def calibrate_sinks(p_BNTS, sinks_BNS, heads_mask_N, beta: float):
    """ACT's calibration: heads in ``heads_mask_N`` keep ``beta`` of their sink weights and
    spread the removed mass over the row's non-sink keys in proportion to their weight.

    A row whose whole mass sits on sinks is left unchanged (nothing to hand the mass to).
    Rows still sum to what they summed to; masked (zero) keys stay zero.
    """
    p = _check(p_BNTS)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    sink = jnp.asarray(sinks_BNS)[:, :, None, :]
    on_sink = jnp.where(sink, p, 0.0)
    rest = p - on_sink
    removed_BNT = (1.0 - beta) * jnp.sum(on_sink, -1)
    rest_sum_BNT = jnp.sum(rest, -1)
    ok_BNT = rest_sum_BNT > 0
    share = rest / jnp.where(ok_BNT, rest_sum_BNT, 1.0)[..., None]
    new = beta * on_sink + rest + removed_BNT[..., None] * share
    new = jnp.where(ok_BNT[..., None], new, p)
    heads = jnp.asarray(heads_mask_N, bool)[None, :, None, None]
    return jnp.where(heads, new, p)


def act_hook(layer: int, heads, num_heads: int, *, threshold: float, beta: float = 0.5,
             keep_first: bool = True) -> Intervene:  # fmt: skip
    """An ``Intervene`` on ``blocks.<layer>.attn.pattern`` applying ACT to ``heads`` on the fly
    (sinks found from the current input's own map)."""
    idx = resolve_indices(heads, num_heads, "act_hook heads")
    mask = jnp.zeros((num_heads,), bool).at[jnp.asarray(idx)].set(True)

    def fn(p_BNTS, ctx):
        if p_BNTS.shape[1] != num_heads:
            raise ValueError(f"act_hook: layer has {p_BNTS.shape[1]} heads, not {num_heads}")
        sinks = find_sinks(p_BNTS, threshold, keep_first=keep_first)
        return calibrate_sinks(p_BNTS, sinks, mask, beta).astype(p_BNTS.dtype)

    return Intervene(f"blocks.{layer}.attn.pattern", fn)
