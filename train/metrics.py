"""Metrics: JSONL and TensorBoard writers, FLOP and MFU estimates, the progress line, a plot.

Model FLOPs per trained token follow the usual estimate ``6 * params`` (forward + backward
matmuls) plus the attention term ``6 * layers * T * heads * (H + V) / 2`` (scores and the
value product, forward and backward, halved for the causal mask). MFU divides achieved model
FLOP/s by a peak taken from a table of dense bf16 peaks by device kind; a CPU's peak is only
estimated (cores x 2 FMA units x 8 fp32 lanes x 2 x 2.5 GHz) and labelled as such.

``metrics.jsonl`` is append-only: a resumed run appends the rows of the steps it trains again
after the rows of the interrupted attempt, and nothing is ever rewritten. Each start appends an
event row (``split`` "start" or "resume", with the harmless config changes). Readers take the
last row per ``(split, step)`` (:func:`latest_rows`); a line cut short by a killed process is
skipped. TensorBoard gets a new event file per start, with ``purge_step`` set on resume so
that TensorBoard shows the resumed values.
"""

from __future__ import annotations

import json
import math
import os

import jax

__all__ = [
    "MetricsWriter",
    "flops_per_token",
    "peak_flops",
    "progress_line",
    "plot_losses",
    "read_metrics",
    "latest_rows",
]

# dense bf16 peak FLOP/s per chip, matched as substrings of jax.Device.device_kind (lowercase)
_PEAK_FLOPS = (
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu7x", 2307e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l4", 121e12),
)
_CPU_FLOPS_PER_CORE = 2 * 8 * 2 * 2.5e9  # FMA units x fp32 lanes (AVX2) x 2 x clock


def _first_attr(obj, names, default=None):
    for name in names:
        value = getattr(obj, name, None)
        if value:  # None or 0: not set
            return value
    return default


def flops_per_token(num_params: int, model_config, seq_len: int) -> float:
    """Training FLOPs per token: ``6 * num_params`` plus the causal attention term.

    Args:
      num_params: parameter count.
      model_config: the model's config; layer/head/dim fields are looked up by common names
        (the attention term is left out when they are missing).
      seq_len: training sequence length T.
    """
    layers = _first_attr(model_config, ("num_layers", "n_layers", "num_hidden_layers"), 0)
    heads = _first_attr(model_config, ("num_heads", "n_heads", "num_attention_heads"), 0)
    qk = _first_attr(model_config, ("resolved_head_dim", "qk_head_dim"))
    if qk is None:
        nope = _first_attr(model_config, ("qk_nope_head_dim",))
        rope = _first_attr(model_config, ("qk_rope_head_dim",), 0)
        qk = nope + rope if nope is not None else _first_attr(model_config, ("head_dim",), 0)
    v = _first_attr(model_config, ("v_head_dim", "head_dim"), qk)
    return 6.0 * num_params + 3.0 * layers * seq_len * heads * (qk + v)


def peak_flops(devices=None) -> tuple[float, str]:
    """Total peak FLOP/s of ``devices`` (default all) and a label saying where it came from."""
    devices = jax.devices() if devices is None else devices
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        cores = os.cpu_count() or 1
        return cores * _CPU_FLOPS_PER_CORE, f"CPU peak estimated ({cores} cores x 80 GFLOP/s)"
    for name, flops in _PEAK_FLOPS:
        if name in kind:
            return flops * len(devices), f"{len(devices)} x {kind} bf16 peak"
    return float("nan"), f"unknown peak for {kind!r}"


def progress_line(
    step: int, total: int, loss: float, tokens_per_s: float, mfu: float, lr: float
) -> str:
    """One human-readable progress line."""
    if math.isnan(tokens_per_s):  # only the compiling first step in this interval
        return f"step {step:>6}/{total}  loss {loss:7.4f}  lr {lr:.2e}  (compiled)"
    return (
        f"step {step:>6}/{total}  loss {loss:7.4f}  lr {lr:.2e}  "
        f"{tokens_per_s:9.0f} tok/s  MFU {100 * mfu:5.2f}%"
    )


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard under ``run_dir`` (process 0 only).

    Args:
      run_dir: output directory.
      tensorboard: also write TensorBoard event files (needs ``tensorboardX``).
      purge_step: the step a resumed run continues from (TensorBoard then hides the earlier
        attempt's events from that step on); None for a fresh run.
    """

    def __init__(self, run_dir: str, *, tensorboard: bool = True, purge_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # a process killed mid-line: end that line so the next row stands alone
                with open(self.path, "a") as f:
                    f.write("\n")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)

    def _append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write(self, step: int, split: str, metrics: dict) -> None:
        """Record ``metrics`` (name -> number) of ``split`` ("train", "eval") at ``step``."""
        if not self.enabled:
            return
        self._append(
            {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        )
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

    def event(self, step: int, split: str, **fields) -> None:
        """Record a non-numeric event row (a start, a resume with its config changes)."""
        if self.enabled:
            self._append({"step": int(step), "split": split, **fields})

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """Every row of a ``metrics.jsonl`` file in file order (a torn last line is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # cut short by a killed process
                continue
    return rows


def latest_rows(rows: list[dict], split: str | None = None) -> list[dict]:
    """The last row per ``(split, step)`` (a resumed run's rows supersede the interrupted
    attempt's), ordered by step; only ``split`` when given."""
    last = {}
    for row in rows:
        if split is None or row.get("split") == split:
            last[(row.get("split"), row["step"])] = row
    return sorted(last.values(), key=lambda r: r["step"])


def plot_losses(metrics_path: str, png_path: str) -> str:
    """Plot train and eval loss against step from ``metrics.jsonl`` into ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = [(r["step"], r["loss"]) for r in latest_rows(rows, split) if "loss" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
