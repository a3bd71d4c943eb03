"""Report per-head scores: a ranked text table and a heads x layers heat map (PNG).

Scores are a [layers, heads] array from any scoring method (``retrieval.retrieval_scores``...).
The command line that loads a trained run and scores it lives with the run loader, in
``train.heads_scan`` (``python -m train.heads_scan --run DIR --method retrieval``): jaxattn does
not import model or training code (DESIGN.md layering).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ranked_table", "heatmap"]


def _check(scores_LN) -> np.ndarray:
    s = np.asarray(scores_LN, np.float64)
    if s.ndim != 2 or 0 in s.shape:
        raise ValueError(f"scores_LN must be a non-empty [layers, heads] array, got {s.shape}")
    return s


def ranked_table(scores_LN, *, method: str = "score", top: int | None = None) -> str:
    """Heads ranked by score, best first (ties: lower layer, then head), as aligned text.

    Args:
      scores_LN: [layers, heads] scores.
      method: the score's name (the column header).
      top: rows to show (None: all).

    Returns:
      ``rank  layer  head  <method>`` lines.
    """
    s = _check(scores_LN)
    order = np.argsort(-s.reshape(-1), kind="stable")
    if top is not None:
        if top < 1:
            raise ValueError(f"top={top} must be >= 1")
        order = order[:top]
    lines = [f"{'rank':>4}  {'layer':>5}  {'head':>4}  {method:>10}"]
    for rank, i in enumerate(order, 1):
        layer, head = divmod(int(i), s.shape[1])
        lines.append(f"{rank:>4}  {layer:>5}  {head:>4}  {s[layer, head]:>10.4f}")
    return "\n".join(lines)


def heatmap(scores_LN, path: str, *, title: str = "", method: str = "score") -> str:
    """Write a heads (rows) x layers (columns) heat map of ``scores_LN`` to PNG ``path``.

    Raises:
      ImportError: matplotlib is not installed (the ``train`` extra has it).
    """
    s = _check(scores_LN)
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * s.shape[0], 1.0 + 0.35 * s.shape[1]))
    im = ax.imshow(s.T, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_xticks(range(s.shape[0]))
    ax.set_yticks(range(s.shape[1]))
    ax.set_title(title or method)
    fig.colorbar(im, ax=ax, label=method)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
