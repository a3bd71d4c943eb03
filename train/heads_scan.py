"""Score every attention head of a trained recall model: ranked table + heat-map PNG.

    python -m train.heads_scan --run DIR --method retrieval [--batch 256] [--png FILE]
    python -m train.heads_scan --trained heads-recall --method retrieval

``--run`` takes a run directory of ``train.pretrain`` (its newest checkpoint, its config's
task); ``--trained`` one of ``train.trained.TRAINED`` (committed weights). The scoring and the
report are ``jaxattn.heads`` (``retrieval``, ``scan``); this module only loads the model and the
task's held-out rows (jaxattn imports no model or training code, so the command lives here).
Methods: ``retrieval`` (Wu et al.'s copy-paste score on the recall queries).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["METHODS", "recall_layout", "score_model", "main"]

METHODS = ("retrieval",)


def recall_layout(seq_len: int) -> tuple[tuple[int, ...], int]:
    """(query rows, context length) of ``train.data.RecallLoader`` rows of ``seq_len``."""
    pairs = min(64, seq_len // 4)
    return tuple(range(2 * pairs, seq_len, 2)), 2 * pairs


def score_model(model, batch: dict, method: str, seq_len: int):
    """[layers, heads] scores of ``method`` on a recall ``batch`` (``inputs_BT`` rows)."""
    from jaxattn.heads import retrieval

    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not one of {list(METHODS)}")
    rows, context = recall_layout(seq_len)
    toks = jnp.asarray(batch["inputs_BT"])
    needles = retrieval.pair_needles(toks, rows, context)
    graphdef, state = nnx.split(model)  # one compiled forward (eager dispatch is slow on CPU)
    score = jax.jit(
        lambda s, t, n: retrieval.retrieval_scores(nnx.merge(graphdef, s), t, rows, n)[0]
    )
    return score(state, toks, needles)


def _load(args):
    from train.config import ConfigError
    from train.data import make_loaders

    if args.trained:
        from train.trained import load_trained, train_config

        config = train_config(args.trained)
        model = load_trained(args.trained)
        out = args.png or f"{args.trained}-{args.method}.png"
    else:
        from train.sample import _saved_train_config, load_model, resolve_checkpoint

        model, meta = load_model(resolve_checkpoint(args.run, flag="--run"))
        config = _saved_train_config(meta)
        out = args.png or os.path.join(args.run, f"heads-{args.method}.png")
    if config.data != "recall":
        raise ConfigError(f"--method {args.method} scores recall queries; the run has data="
                          f"{config.data!r}")  # fmt: skip
    config = dataclasses.replace(config, batch_size=args.batch)
    return model, make_loaders(config)[1].batch(0), config.seq_len, out


def main(argv=None) -> None:
    """Command-line entry point."""
    from jaxattn.heads.scan import heatmap, ranked_table

    doc = __doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m train.heads_scan", description=doc)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a train.pretrain run directory")
    src.add_argument("--trained", help="a committed trained model (train.trained.TRAINED)")
    p.add_argument("--method", default="retrieval", choices=METHODS)
    p.add_argument("--batch", type=int, default=256, help="held-out rows to score")
    p.add_argument("--top", type=int, default=None, help="rows of the table (default all)")
    p.add_argument("--png", default=None, help="heat-map file (default beside the run)")
    args = p.parse_args(argv)
    model, batch, seq_len, out = _load(args)
    scores_LN = score_model(model, batch, args.method, seq_len)
    print(ranked_table(scores_LN, method=args.method, top=args.top))
    print(f"heat map: {heatmap(scores_LN, out, method=args.method)}")


if __name__ == "__main__":
    main()
