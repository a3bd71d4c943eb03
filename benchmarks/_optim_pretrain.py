"""The pretraining comparison of ``benchmarks/optim.py --pretrain-steps N``.

Every method trains the same tiny MLA model (``mla-tiny-default`` shrunk to d_model 64, 2
layers, mlp 192) from the same initial seed on the built-in corpus, with the same batches
(16 x 64 tokens), steps, learning-rate schedule shape (``train.pretrain`` defaults: warmup 10%,
cosine) and weight decay, through ``train.pretrain.run``, once per peak lr of a grid (``LRS``:
the papers tune lr per method); the table gives each method at its best lr and at the common
lr 2e-3. The low-rank methods work at rank d/4 = 16 on the attention and MLP projections
(embeddings, head and norms: AdamW):

* AdamW                      ``adamw:.*``
* GaLore / Fira / GaLore-DCT ``galore|fira(rank=16, update_proj_gap=50, scale=1)`` (scale 1:
  the lr grid covers the product scale x lr; the GaLore paper's 0.25 x 0.01), then AdamW
* SLTrain                    ``model.parameterization=sltrain`` (r 16, density 0.03, scale
  alpha / r with the default alpha 32), AdamW
* SST                        ``model.parameterization=sst`` (full spectrum) with
  ``sst(rank=16, every=20)``: 16 singular-vector pairs per kernel, redrawn every 20 steps,
  a re-SVD of each kernel every round (20 · ceil(k / 16) steps)
* low-rank + refactor        ``model.parameterization=lowrank`` (r 16) with
  ``refactor(every=50)``: refactorisation + momentum reset every 50 steps

Printed: a table of the final eval loss (held-out windows of the corpus), its ratio to
AdamW's, trainable parameters and optimizer-state bytes; written next to it under ``out``:
``pretrain.md`` (the table) and ``pretrain_loss.png`` (train-loss curves).
"""

from __future__ import annotations

import dataclasses
import os

import jax

RANK = 16
PROJ = "/(attn|mlp)/"
MODEL = ("d_model=64", "num_layers=2", "num_heads=2", "mlp_dim=192", "kv_lora_rank=32",
         "qk_nope_head_dim=16", "qk_rope_head_dim=8", "v_head_dim=16",
         "implementation=xla")  # fmt: skip
_GAL = f"rank={RANK},update_proj_gap=50,scale=1.0"
# name: (model overrides, optimizer rules)
METHODS = {
    "AdamW": ((), ("adamw:.*",)),
    "GaLore": ((), (f"galore({_GAL}):{PROJ}", "adamw:.*")),
    "Fira": ((), (f"fira({_GAL}):{PROJ}", "adamw:.*")),
    "GaLore-DCT": ((), (f"galore({_GAL},projector='dct'):{PROJ}", "adamw:.*")),
    "SLTrain": (("parameterization=sltrain", f"parameterization_rank={RANK}"), ("adamw:.*",)),
    "SST": (("parameterization=sst",), (f"sst(rank={RANK},every=20):.*",)),
    "low-rank + refactor": (
        ("parameterization=lowrank", f"parameterization_rank={RANK}"),
        ("refactor(every=50):.*",),
    ),
}


def configs(steps: int, out: str) -> dict:
    """One ``TrainConfig`` per method (same data, steps, schedule and seed)."""
    from train.config import TrainConfig

    base = TrainConfig(
        name="bench", model_overrides=MODEL, seq_len=64, batch_size=16, steps=steps,
        warmup_steps=max(1, steps // 10), eval_every=steps, eval_batches=8,
        log_every=max(1, steps // 30), ckpt_every=steps, steps_per_call=10,
        tensorboard=False, plot=False, sample_tokens=0, overwrite=True,
    )  # fmt: skip
    return {
        name: dataclasses.replace(
            base,
            model_overrides=MODEL + extra,
            optimizer=rules,
            run_dir=os.path.join(out, name.replace(" ", "_").replace("+", "plus")),
        )  # fmt: skip
        for name, (extra, rules) in METHODS.items()
    }


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# the learning-rate grid every method is trained on (``--pretrain-lrs``); the papers tune lr
# per method (GaLore: 0.01 with scale 0.25 against AdamW's tuned 1e-3), so each row reports its
# best lr of the same grid beside its loss at the common lr
LRS = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
COMMON_LR = 2e-3


def run(steps: int, out: str, methods=None, lrs=(COMMON_LR,)) -> dict:
    """Train every method at every lr of ``lrs``; print and write the table (each method at
    its best lr, and at ``COMMON_LR`` when in the grid) and the best runs' curves.

    Returns:
      ``{method: {lr: (eval loss, trainable params, optimizer-state bytes, seconds)}}``.
    """
    from train import pretrain
    from train.metrics import latest_rows, read_metrics

    os.makedirs(out, exist_ok=True)
    rows, curves = {}, {}
    for name, config in configs(steps, out).items():
        if methods and name not in methods:
            continue
        for lr in lrs:
            result = pretrain.run(
                dataclasses.replace(config, lr=lr, run_dir=f"{config.run_dir}_lr{lr:g}")
            )
            state = result.state
            trainable = set(result.trainer.trainable)
            n_params = sum(
                x.size for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
                if jax.tree_util.keystr(p, simple=True, separator="/") in trainable
            )  # fmt: skip
            rows.setdefault(name, {})[lr] = (
                result.eval_loss, n_params, _bytes(state["opt_state"]), result.seconds
            )  # fmt: skip
            metrics = read_metrics(os.path.join(result.run_dir, "metrics.jsonl"))
            curves.setdefault(name, {})[lr] = [
                (r["step"], r["loss"]) for r in latest_rows(metrics, "train")
            ]
    best = {name: min(by_lr, key=lambda lr: by_lr[lr][0]) for name, by_lr in rows.items()}
    ref = rows.get("AdamW") and rows["AdamW"][best["AdamW"]][0]
    ref = ref or next(iter(rows.values()))[next(iter(best.values()))][0]
    common = COMMON_LR in lrs
    lines = [
        f"Pretraining, {steps} steps x 16 x 64 tokens, rank {RANK} = d/4 (eval: 8 held-out "
        f"batches); lr grid {', '.join(f'{lr:g}' for lr in lrs)}; × AdamW: against AdamW at "
        "its best lr",
        "",
        "| method | best lr | final eval loss | × AdamW |"
        + (f" loss at lr {COMMON_LR:g} | × AdamW |" if common else "")
        + " trainable params | optimizer state KB | s |",
        "|---|---|---|---|" + ("---|---|" if common else "") + "---|---|---|",
    ]
    for name, by_lr in rows.items():
        lr = best[name]
        loss, n, state_b, secs = by_lr[lr]
        at = by_lr[COMMON_LR][0] if common else None
        lines.append(
            f"| {name} | {lr:g} | {loss:.4f} | {loss / ref:.3f} |"
            + (f" {at:.4f} | {at / ref:.3f} |" if common else "")
            + f" {n:,} | {state_b / 1024:.1f} | {secs:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(out, "pretrain.md"), "w") as f:
        f.write(table + "\n")
    _plot(
        {name: curves[name][best[name]] for name in rows},
        os.path.join(out, "pretrain_loss.png"),
        steps,
    )
    print(f"\nwrote {os.path.join(out, 'pretrain.md')} and pretrain_loss.png")
    return rows


def _plot(curves: dict, path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts, strict=True), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(f"tiny MLA LM, built-in corpus, rank {RANK} = d/4")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
