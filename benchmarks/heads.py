"""Attention-head tools: the cost of the hook mechanism and the time of each scan.

On the committed trained recall model (``train.trained.load_trained("heads-recall")``) and a
held-out batch of ``--batch`` rows, median seconds (``benchmarks._timing.median_seconds``;
variants alternate in each of ``--rounds`` rounds, median over rounds) of jitted programs:

  forward                 the plain forward (no hooks)
  forward, hooks=()       the forward through ``heads.run_with_hooks`` with no hook: the same
                          program (the jaxprs are compared and printed), so ratio ~1
  capture pattern rows    every layer's ``attn.pattern`` at the query rows (from the LSE)
  capture all points      ``run_with_cache`` of every point but scores / pattern
  scan retrieval          Wu et al.'s retrieval scores of all heads (one forward)
  scan PEAR suppression   loss with each head masked (L·N + 1 runs of one compiled program)
  scan QK-score           QK / attention scores of the options (one forward)
  ACT forward             the forward with ACT calibrating every head of layer 1

Usage: ``python -m benchmarks.heads [--batch 256] [--repeats 5] [--min-run-ms 100] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks._timing import median_seconds
from jaxattn import heads
from jaxattn.heads import maps, methods, pear, retrieval

__all__ = ["rows_of", "main"]


def _jit(graphdef, fn):
    return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))


def rows_of(batch_size: int, repeats: int, min_run_s: float, rounds: int = 3):
    """[(name, seconds)] of every variant, and whether the no-hook jaxpr equals the plain one."""
    from train.heads_scan import recall_layout
    from train.trained import eval_batch, load_trained, train_config

    model = load_trained("heads-recall")
    batch = eval_batch("heads-recall", batch_size=batch_size)
    rows, context = recall_layout(train_config("heads-recall").seq_len)
    toks = jnp.asarray(batch["inputs_BT"])
    graphdef, state = nnx.split(model)
    L, N = len(model.layers), model.config.num_heads
    needles = retrieval.pair_needles(toks, rows, context)
    w = jnp.asarray(batch["weights_BT"])
    tgt = jnp.asarray(batch["targets_BT"])

    def loss(m, scales_LN):
        logits, _ = heads.run_with_hooks(m, toks, pear.coefficient_hooks(scales_LN))
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.sum(jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0] * w) / jnp.sum(w)

    loss_j = _jit(graphdef, loss)
    ones = jnp.ones((L, N))

    def suppression(s):
        return [loss_j(s, ones.at[i, n].set(0.0)) for i in range(L) for n in range(N)]

    pattern = [heads.Capture(f"blocks.{i}.attn.pattern", positions=rows) for i in range(L)]
    plain = _jit(graphdef, lambda m, t: m(t))
    no_hooks = _jit(graphdef, lambda m, t: heads.run_with_hooks(m, t, ())[0])
    same = str(jax.make_jaxpr(plain)(state, toks)) == str(jax.make_jaxpr(no_hooks)(state, toks))
    opts = jnp.tile(jnp.array([[1, 3, 5, 7]]), (toks.shape[0], 1))
    act = [maps.act_hook(L - 1, None, N, threshold=0.3)]
    variants = {
        "forward": (plain, (state, toks)),
        "forward, hooks=()": (no_hooks, (state, toks)),
        "capture pattern rows": (
            _jit(graphdef, lambda m, t: heads.run_with_hooks(m, t, pattern)),
            (state, toks),
        ),  # noqa: E501
        "capture all points": (
            _jit(
                graphdef,
                lambda m, t: heads.run_with_cache(
                    m, t, lambda n: not n.endswith(("scores", "pattern"))
                ),
            ),
            (state, toks),
        ),  # noqa: E501
        "scan retrieval": (
            _jit(graphdef, lambda m, t, n: retrieval.retrieval_scores(m, t, rows, n)[0]),
            (state, toks, needles),
        ),  # noqa: E501
        "scan PEAR suppression": (suppression, (state,)),
        "scan QK-score": (
            _jit(graphdef, lambda m, t, o: methods.option_scores(m, t, rows[-1], o)),
            (state, toks, opts),
        ),  # noqa: E501
        "ACT forward": (
            _jit(graphdef, lambda m, t: heads.run_with_hooks(m, t, act)[0]),
            (state, toks),
        ),  # noqa: E501
    }
    times = {name: [] for name in variants}
    for _ in range(rounds):  # variants alternate within a round: load drifts hit all alike
        for name, (fn, args) in variants.items():
            times[name].append(median_seconds(fn, args, repeats, min_run_s))
    return [(name, float(np.median(t))) for name, t in times.items()], same


def main(argv=None) -> int:
    """Print the markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-run-ms", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows, same = rows_of(args.batch, args.repeats, args.min_run_ms / 1000, args.rounds)
    base = dict(rows)["forward"]
    print(f"heads-recall, batch {args.batch}, {jax.devices()[0].platform}; "
          f"no-hook jaxpr == plain jaxpr: {same}")  # fmt: skip
    print("| variant | ms | x forward |")
    print("|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s * 1e3:.3f} | {s / base:.2f} |")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0 if np.isfinite(base) else 1


if __name__ == "__main__":
    raise SystemExit(main())
