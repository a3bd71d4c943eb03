"""Step time and memory of the real train step under several optimizer rule sets.

The real train step (``train.step``, fp32, one device, ``steps_per_call`` steps per call as
``train.loop`` runs them) of the default model (``mla-tiny-default`` at the
``train.pretrain`` defaults: batch 16 x 128 tokens) under ``optimizer`` rule sets, the first
one the baseline. ``--variants freeze`` (default): every parameter trains (``adamw:.*``);
only the last block trains; only the first block trains (``frozen:^(?!layers/i/)``,
``adamw:.*``). Frozen parameters get no weight gradient, no gradient norm and no optimizer
state (``train.optim``); the backward pass still runs through every block above the trained
one (activation gradients), so training the first block saves less than training the last.
``--variants lowrank``: AdamW; GaLore (rank d_model/4, scale 0.25, SVD) on every attention
and MLP matrix, AdamW elsewhere, at T = update_proj_gap 200 and at T = 10; Fira at T = 200.
The projector refresh (an SVD per matrix, a ``lax.cond`` in the step) runs at steps 0, T,
2T, ...: the timed rounds of the T = 200 variant hold none (it is the steady step), those of
T = 10 one per 10 steps, so ``(t_10 - t_200) * 10`` is the refresh's extra cost and
``t_200 + (t_10 - t_200) * 10 / 200`` the step amortised over T = 200. ``--rules`` adds a
rule set of its own (comma-separated rules; repeatable).

Rows: median seconds per step over ``--rounds`` rounds (the variants alternate in each round,
so a slow spell of a shared machine hits all alike), its ratio to full training and the
range of the per-round ratios, XLA's FLOP count of the compiled step (``cost_analysis()``)
and its memory (``memory_analysis()``: the arguments, i.e. parameters + optimizer state +
batch, and the temporaries).

Usage: ``python -m benchmarks.freeze [--variants freeze|lowrank] [--rules R1,R2 ...]
[--clock wall|process] [--batch 16] [--seq 128] [--steps 10] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from benchmarks.train_throughput import build_trainer
from models import get_config
from train.config import TrainConfig, split_list
from train.data import load_tokens
from train.optim import path_string
from train.platform import configure_cpu

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def runner(model_config, rules, batch, seq, tokens_N, steps_per_call, clock=time.perf_counter):
    """``(run(n) -> seconds for n steps, memory dict, trainable parameter count)``, compiled
    and warmed up."""
    trainer, loader, state, rest = build_trainer(
        model_config, batch, seq, tokens_N, steps_per_call, optimizer=rules
    )
    box = {"state": state, "step": 0}

    def batches(k):
        items = [loader.batch(box["step"] + i) for i in range(k)]
        return trainer.put_batches({key: np.stack([b[key] for b in items]) for key in items[0]})

    compiled = trainer.train_steps.lower(state, rest, batches(steps_per_call)).compile()
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = {
        "argument": stats.argument_size_in_bytes if stats else float("nan"),
        "temp": stats.temp_size_in_bytes if stats else float("nan"),
        # XLA counts a loop body once: this is one step's count
        "flops": (cost or {}).get("flops", float("nan")),
    }

    def run(n: int) -> float:
        t0 = clock()
        for _ in range(n // steps_per_call):
            box["state"], m = trainer.train_steps(box["state"], rest, batches(steps_per_call))
            box["step"] += steps_per_call
        jax.block_until_ready(m)
        return clock() - t0

    run(steps_per_call)  # compile and warm up
    trainable = sum(
        x.size
        for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
        if path_string(p) in trainer.trainable
    )
    return run, memory, trainable


def variants(preset: str, model_config) -> dict[str, tuple[str, ...]]:
    """``{name: rules}`` of a preset (module docstring); the first is the baseline."""
    if preset == "freeze":
        last = model_config.num_layers - 1
        return {
            "full training (adamw:.*)": ("adamw:.*",),
            f"only layers/{last} trains": (f"frozen:^(?!layers/{last}/)", "adamw:.*"),
            "only layers/0 trains": ("frozen:^(?!layers/0/)", "adamw:.*"),
        }
    rank = model_config.d_model // 4
    lowrank = lambda name, gap: (
        f"{name}(rank={rank},update_proj_gap={gap},scale=0.25):/(attn|mlp)/",
        "adamw:.*",
    )
    return {
        "adamw:.*": ("adamw:.*",),
        f"galore r{rank} T=200": lowrank("galore", 200),
        f"galore r{rank} T=10": lowrank("galore", 10),
        f"fira r{rank} T=200": lowrank("fira", 200),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seq", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--steps", type=int, default=10, help="steps timed per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (median reported)")
    parser.add_argument("--steps-per-call", type=int, default=TrainConfig.steps_per_call)
    parser.add_argument("--variants", choices=("freeze", "lowrank"), default="freeze")
    parser.add_argument("--rules", action="append", default=[],
                        help="an extra rule set, comma-separated (repeatable)")  # fmt: skip
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="process: CPU seconds of all threads (a shared machine)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps % args.steps_per_call:
        parser.error(f"--steps {args.steps} must be a multiple of --steps-per-call")
    tuned = configure_cpu()
    tokens_N = load_tokens("builtin")
    model_config = get_config(TrainConfig.model)
    rule_sets = variants(args.variants, model_config)
    rule_sets |= {rules: tuple(split_list(rules)) for rules in args.rules}  # as --set parses
    runners = {
        name: runner(
            model_config,
            rules,
            args.batch,
            args.seq,
            tokens_N,
            args.steps_per_call,
            CLOCKS[args.clock],
        )  # fmt: skip
        for name, rules in rule_sets.items()
    }
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, (run, _, _) in runners.items():
            times[name].append(run(args.steps) / args.steps)
    full = times[next(iter(times))]
    print(
        f"\n{args.variants} rule sets vs the first, {TrainConfig.model}, "
        f"{jax.devices()[0].device_kind} "
        f"({os.cpu_count()} cores), batch {args.batch} x {args.seq}, fp32, {args.steps_per_call}"
        f" steps per call; {args.clock} clock; median of {args.rounds} rounds of {args.steps} "
        "steps, variants "
        f"alternating; XLA CPU tuning {'on' if tuned else 'off'}"
    )
    heads = [("variant", 26), ("trainable", 9), ("ms/step", 8), ("vs 1st", 7),
             ("per round", 11), ("GFLOP/step", 10), ("args MB", 7), ("temp MB", 7)]  # fmt: skip
    cells = [f"{h:{'>' if i else '<'}{w}s}" for i, (h, w) in enumerate(heads)]
    print("| " + " | ".join(cells) + " |")
    print("|" + "|".join("-" * (w + 2) for _, w in heads) + "|")
    for name, (_, memory, trainable) in runners.items():
        ratios = [t / f for t, f in zip(times[name], full, strict=True)]
        print(
            f"| {name:26s} | {trainable / 1e6:8.2f}M | {statistics.median(times[name]) * 1e3:8.1f}"
            f" | {statistics.median(times[name]) / statistics.median(full):7.2f} "
            f"| {min(ratios):.2f}-{max(ratios):.2f}   | {memory['flops'] / 1e9:10.2f} "
            f"| {memory['argument'] / 1e6:7.1f} "
            f"| {memory['temp'] / 1e6:7.1f} |"
        )


if __name__ == "__main__":
    main()
