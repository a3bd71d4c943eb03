"""Conversions of a trained GQA model: size, cache and perplexity before/after, per method.

Issue 21's benchmark (item 7). The model is the project's own: by default ``llama-tiny``
(4 query heads sharing 2 kv heads of dim 16, 2 layers) pretrained for ``--train-steps`` steps on
the built-in corpus with ``train.pretrain.run`` (no download); ``--from DIR`` reads a Hugging
Face directory (``models.from_hf``) instead, e.g. a longer run exported with ``models.to_hf``.
Each method (``models.convert``) calibrates on the first ``--calib-rows`` windows of the corpus
(the training split) and is evaluated on the last ``--eval-rows`` windows (the held-out
split, as ``train.data`` cuts it):

- ``transmla exact``: GQA rewritten as MLA, same cache bytes (logits equal to fp32 rounding);
- ``transmla rope+pca L=...``: every step (exact, RoPE with ``rope_dim`` 16 and the freqfold
  search, PCA of the latent to ``kv_lora_rank`` L, latent norm); L = 48 is the GQA-equivalent
  (same cache bytes: the target is perplexity within 1% of the original), L = 16 halves it;
- ``kv_heads K'=1``: the kv heads PCA-merged into one (MQA), half the cache.

The table gives parameters, cache bytes per token and eval perplexity before → after, and the
conversion time (``--plot``: perplexity increase against the cache kept); the decode table
gives greedy ``jaxattn.generate`` tokens/s (batch ``--decode-batch``, ``--decode-tokens`` new
tokens after a 16-token prompt; median of ``--repeats`` runs after a compile) for the original
and the TransMLA models.

Usage: ``python -m benchmarks.convert [--from HF_DIR] [--train-steps 200]
[--methods exact,rope48,rope16,kv1]
[--plot convert.png]``
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks._timing import median_seconds
from jaxattn.generate import generate
from models import convert as mc

# label -> (name, method, options); rope_dim 16 = the head dim (collapse 1), freqfold searched
# (measured on the default model: rope_dim 8 cost +9% to +23% perplexity, rope_dim 16 +4%)
METHODS = {
    "exact": ("transmla exact", "transmla", dict(steps=("exact",))),
    "rope48": (
        "transmla rope+pca L=48",
        "transmla",
        dict(rope_dim=16, freqfold="auto", kv_lora_rank=48),
    ),
    "rope16": (
        "transmla rope+pca L=16",
        "transmla",
        dict(rope_dim=16, freqfold="auto", kv_lora_rank=16),
    ),
    "kv1": ("kv_heads K'=1", "kv_heads", dict(num_kv_heads=1)),
}


def trained_model(steps: int, seq_len: int):
    """``llama-tiny`` pretrained ``steps`` steps on the built-in corpus (``train.pretrain``)."""
    from train.config import TrainConfig
    from train.loop import host_params
    from train.pretrain import run

    config = TrainConfig(
        name="convert-bench",
        model="llama-tiny",
        steps=steps,
        seq_len=seq_len,
        batch_size=16,
        eval_every=steps,
        ckpt_every=steps,
        warmup_steps=max(1, steps // 10),
        run_dir=tempfile.mkdtemp(prefix="convert-bench-"),
        tensorboard=False,
        plot=False,
        sample_tokens=0,
        async_checkpoint=False,
    )
    result = run(config)
    return result.trainer.model(host_params(result.state["params"]), result.rest)


def _params(model) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _measure(model, held, seq_len: int) -> tuple[int, int, float]:
    """(parameters, cache bytes per token, perplexity on ``held``)."""
    return (
        _params(model),
        model.cache_bytes_per_token(),
        mc.perplexity(model, held, seq_len=seq_len),
    )


def splits(model, calib_rows: int, eval_rows: int, seq_len: int):
    """(calibration [calib_rows, seq_len] from the start, held-out tokens from the end)."""
    from train.data import load_tokens

    tokens = np.asarray(load_tokens("builtin")) % model.config.vocab_size
    held = eval_rows * seq_len + 1
    if len(tokens) < calib_rows * seq_len + held:
        raise ValueError(f"the corpus has {len(tokens)} tokens, too few for the rows asked for")
    return tokens[: calib_rows * seq_len].reshape(calib_rows, seq_len), tokens[-held:]


def conversions(model, calib, held, labels, seq_len: int):
    """(the method table as markdown lines, {label: converted model}, [(name, cache after /
    before, perplexity increase %)] for the plot)."""
    before = (
        _params(model),
        model.cache_bytes_per_token(),
        mc.perplexity(model, held, seq_len=seq_len),
    )
    lines = [
        "| method | parameters | cache B/token | eval perplexity | Δ ppl | convert s |",
        "|---|---|---|---|---|---|",
    ]
    out, points = {}, []
    for label in labels:
        name, method, options = METHODS[label]
        start = time.perf_counter()
        new, _ = mc.convert(model, method, calib, **options)
        seconds = time.perf_counter() - start
        after = (
            _params(new),
            new.cache_bytes_per_token(),
            mc.perplexity(new, held, seq_len=seq_len),
        )
        rise = 100 * (after[2] / before[2] - 1)
        lines.append(
            f"| {name} | {before[0]:,} → {after[0]:,} | {before[1]} → {after[1]} | "
            f"{before[2]:.3f} → {after[2]:.3f} | {rise:+.2f}% | {seconds:.1f} |"
        )
        out[label] = new
        points.append((name, after[1] / before[1], rise))
    return lines, out, points


def plot(points, path: str) -> None:
    """Perplexity increase against the cache kept, one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ratio, rise in points:
        ax.scatter(ratio, rise)
        ax.annotate(name, (ratio, rise), fontsize=7)
    ax.set_xlabel("cache bytes / token, after / before")
    ax.set_ylabel("eval perplexity increase (%)")
    fig.tight_layout()
    fig.savefig(path)


def decode_speed(models_by_name, *, batch: int, new_tokens: int, repeats: int):
    """Greedy ``generate`` tokens/s per model (markdown lines)."""
    prompt = jnp.zeros((batch, 16), jnp.int32) + jnp.arange(16, dtype=jnp.int32)
    lengths = jnp.full((batch,), 16, jnp.int32)
    lines = ["| model | cache B/token | decode tokens/s |", "|---|---|---|"]
    for name, m in models_by_name.items():

        def run(m=m):
            return generate(
                m, prompt, lengths, max_new_tokens=new_tokens, rng=jax.random.key(0)
            ).tokens_BS

        seconds = median_seconds(run, (), repeats)
        rate = batch * new_tokens / seconds
        lines.append(f"| {name} | {m.cache_bytes_per_token()} | {rate:,.0f} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.convert", description=__doc__)
    ap.add_argument("--from", dest="src", default="", help="Hugging Face model directory")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {list(METHODS)}")
    ap.add_argument("--calib-rows", type=int, default=32)
    ap.add_argument("--eval-rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plot", default="", help="write the perplexity vs cache plot (PNG) here")
    args = ap.parse_args(argv)
    labels = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(labels) - set(METHODS))
    if unknown:
        ap.error(f"--methods {unknown}: not among {list(METHODS)}")
    if args.src:
        from models.hf import from_hf

        model = from_hf(args.src)
    else:
        model = trained_model(args.train_steps, args.seq_len)
    calib, held = splits(model, args.calib_rows, args.eval_rows, args.seq_len)
    lines, converted, points = conversions(model, calib, held, labels, args.seq_len)
    print("\n".join(lines))
    if args.plot:
        plot(points, args.plot)
        print(f"saved {args.plot}")
    decoders = {"original (GQA)": model}
    decoders |= {METHODS[k][0]: v for k, v in converted.items() if METHODS[k][1] == "transmla"}
    if args.decode_tokens > 0:
        print()
        print(
            "\n".join(
                decode_speed(
                    decoders,
                    batch=args.decode_batch,
                    new_tokens=args.decode_tokens,
                    repeats=args.repeats,
                )
            )
        )


if __name__ == "__main__":
    main()
