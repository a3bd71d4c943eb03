"""KV-cache quantization (issue 19): bytes per token, decode tokens/s and recall, in one run.

Three tables:

1. **Bytes per token** per cache format at contexts 8K..128K, for a 7B-shaped MHA layer stack
   (32 layers, 32 kv heads of width 128) and the training default (mla-tiny-default: 4 latent
   layers, L + P = 80): exact bytes of the buffers (``jax.eval_shape`` of the caches, so
   nothing is allocated) next to the analytic formula, the ratio to the bf16 cache, and the
   largest context that fits ``--budget-gib`` (batch 1).

   KIVI, per layer and token: keys K·(⌈H/c⌉·w + 2·s·H/G) (b-bit codes in words of w bytes
   holding c codes, an fp16 scale and zero per channel per G tokens), values
   K·(⌈V/c⌉·w + 2·s·V/G) (a scale and zero per token per G channels); plus the two
   full-precision windows of R tokens, fixed: 2·R·K·H·(fp bytes). A latent row of L + P
   numbers is quantized per channel like a key.

   MiKV (``mikv``, dense layers only), per layer and token: keys and values both per token,
   K·(⌈H/c⌉·w + 2·s·H/G) each; fixed: the two R-token windows, their fp32 scores (4·R) and
   the table of S full-precision tokens with an int32 position and an fp32 score each,
   S·(2·K·H·(fp bytes) + 8).
2. **Decode tokens/s at ``--context``** of one attention layer's cache step (GQA, K=8, N=32,
   H=128, batch 1): fp32 and bf16 dense caches and KIVI caches, ``--steps`` one-token steps
   in one jitted loop over a donated cache, updated in place (the median of ``--repeats``
   calls after a compiling one); ratios to fp32.
3. **Recall**: a small MLA model (``RECALL_MODEL``) trained here on associative recall
   (train/configs/recall.py's data at ``--recall-seq-len``, ``--train-steps`` of batch 32)
   answers held-out queries through its cache: the pairs are prefilled, then the queries are
   decoded one token per step, and each answer is the greedy (argmax) next token. Accuracy
   with fp32 caches and with each KIVI setting (at seq_len 64 the target's 128-token window
   holds the whole row in full precision; the G8 R8 settings quantize the pairs).

  python -m benchmarks.kv_quant                  # the recorded run (BENCHMARKS.md)
  python -m benchmarks.kv_quant --quick          # small sizes (a smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.cache import CacheConfig, KVCache, dense_cache, latent_cache
from jaxattn.masks import Causal
from jaxattn.ops import kv_quant
from train.platform import configure_cpu

GIB = 1 << 30


def kivi(bits, group=32, residual=128):
    """The CacheConfig fields of a KIVI setting (fp16 scales and zeros)."""
    return {"format": "kivi", "bits": bits, "group_size": group, "residual": residual}


def mikv(bits, important, group=32, residual=128):
    """The CacheConfig fields of a MiKV setting (S = ``important`` full-precision tokens)."""
    return dict(kivi(bits, group, residual), format="mikv", important=important)


def _cache_bytes(make, ctx: int) -> int:
    """Exact bytes of one sequence's buffers (lengths excluded), from abstract shapes."""
    cache = jax.eval_shape(lambda: make(ctx))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) - 4


def _kivi_formula(fields, widths, ctx, fp_bytes) -> float:
    """The analytic KIVI bytes of one layer at ``ctx`` tokens: (codes + stats)·ctx + windows.

    ``widths``: ((heads, dim), ...) per quantized tensor (the keys' stats per channel per G
    tokens and the values' per token per G channels cost the same, 2·2·dim/G bytes a token)."""
    b, g, r = fields["bits"], fields["group_size"], fields["residual"]
    words = kv_quant.word_dtype(b).itemsize
    per_token, window = 0.0, 0
    for heads, dim in widths:
        per_token += heads * (kv_quant.packed_width(dim, b) * words + 2 * 2 * dim / g)
        window += r * heads * dim * fp_bytes
    slots = -(-ctx // g) * g
    if fields["format"] == "mikv":  # the table and the scores; S is capped at the slots
        s = min(fields["important"], slots)
        window += r * 4 + s * (sum(h * d for h, d in widths) * fp_bytes + 8)
    return per_token * slots + window


def bytes_table(contexts, budget_gib: float) -> list[str]:
    """Table 1 rows (markdown)."""
    shapes = {
        "7B MHA (32 layers, K=32, H=128)": (32, "dense", dict(num_kv_heads=32, head_dim=128)),
        "mla-tiny-default (4 layers, L+P=80)": (4, "latent", dict(kv_lora_rank=64, rope_dim=16)),
    }
    formats = {"bf16": None, "kivi-2": kivi(2), "kivi-3": kivi(3), "kivi-4": kivi(4),
               "kivi-8": kivi(8), "mikv-2 S=1024": mikv(2, 1024),
               "mikv-4 S=1024": mikv(4, 1024)}  # fmt: skip
    head = "| model | format | " + " | ".join(f"B/token @{c // 1024}K" for c in contexts)
    rows = [head + " | formula == exact | ratio to bf16 @32K | max context in budget |"]
    rows.append("|" + "---|" * (len(contexts) + 5))
    for name, (layers, layout, dims) in shapes.items():
        build = dense_cache if layout == "dense" else latent_cache
        widths = ([(dims["num_kv_heads"], dims["head_dim"])] * 2 if layout == "dense"
                  else [(1, dims["kv_lora_rank"] + dims["rope_dim"])])  # fmt: skip
        bf16_32k = None
        for fmt, fields in formats.items():
            if layout == "latent" and fields is not None and fields["format"] == "mikv":
                continue  # MiKV's table holds per-head rows: dense layers only
            cfg = None if fields is None else CacheConfig(**fields)

            def make(ctx, cfg=cfg):
                return build(batch=1, capacity=ctx, dtype=jnp.bfloat16, config=cfg, **dims)

            per = [layers * _cache_bytes(make, c) / c for c in contexts]
            if fields is None:
                formula_ok = "-"
            else:
                ok = all(_cache_bytes(make, c) == _kivi_formula(fields, widths, c, 2)
                         for c in contexts)  # fmt: skip
                formula_ok = "yes" if ok else "NO"
            at32 = layers * _cache_bytes(make, 32768) / 32768
            bf16_32k = at32 if fields is None else bf16_32k
            # the largest context whose buffers fit the budget: bytes are affine in the slots
            # (past MiKV's table size S, which is capped at the slots)
            g = 1 if fields is None else fields["group_size"]
            c1 = max(g, -(-(fields or {}).get("important", 0) // g) * g)
            b1, b2 = _cache_bytes(make, c1), _cache_bytes(make, c1 + g)
            per_slot = (b2 - b1) / g
            fixed = b1 - per_slot * c1
            lo = int((budget_gib * GIB / layers - fixed) // per_slot) // g * g
            cells = " | ".join(f"{p:,.1f}" for p in per)
            rows.append(
                f"| {name} | {fmt} | {cells} | {formula_ok} | {at32 / bf16_32k:.4f} | {lo:,} |"
            )
    return rows


def decode_table(context: int, steps: int, repeats: int, names=None) -> list[str]:
    """Table 2 rows: one GQA layer's cache step at ``context`` (median of ``repeats``);
    ``names``: the formats to time (default all; "fp32 dense" is always the first)."""
    b, n, k, h = 1, 32, 8, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[2], (b, 1, n, h))
    formats = {
        "fp32 dense": (None, jnp.float32),
        "bf16 dense": (None, jnp.bfloat16),
        "kivi-2 (fp32 window)": (kivi(2), jnp.float32),
        "kivi-4 (fp32 window)": (kivi(4), jnp.float32),
        "kivi-2 (bf16 window)": (kivi(2), jnp.bfloat16),
    }
    if names is not None:
        formats = {n: f for n, f in formats.items() if n == "fp32 dense" or n in names}
    fill_n = context - steps
    results = {}
    for name, (fields, dtype) in formats.items():
        cfg = None if fields is None else CacheConfig(**fields)

        @jax.jit
        def fill(dtype=dtype, cfg=cfg):
            c = dense_cache(batch=b, capacity=context, num_kv_heads=k, head_dim=h, dtype=dtype,
                            config=cfg)  # fmt: skip
            kk = jax.random.normal(ks[0], (b, fill_n, k, h), dtype)
            vv = jax.random.normal(ks[1], (b, fill_n, k, h), dtype)
            return c.write(kk, vv).advance(fill_n)

        @functools.partial(jax.jit, donate_argnums=0)
        def run(cache):  # ``steps`` decode steps, then back to the filled length
            def body(i, carry):
                cache, acc = carry
                o, cache = cache.update_and_attend(q, q[:, :, :k], q[:, :, :k], mask=Causal())
                return cache, acc + o[0, 0, 0, 0].astype(jnp.float32)

            cache, acc = jax.lax.fori_loop(0, steps, body, (cache, jnp.float32(0)))
            return cache.with_lengths(fill_n), acc

        cache = fill()
        bpt = cache.bytes_per_token(context) if cfg is not None else KVCache.bytes_per_token(cache)
        times = []
        for _ in range(repeats + 1):  # the first call compiles
            t0 = time.perf_counter()
            cache, acc = run(cache)  # the cache is donated: updated in place, never copied
            jax.block_until_ready(acc)
            times.append(time.perf_counter() - t0)
        results[name] = (steps / statistics.median(times[1:]), bpt)
        del cache
    base = results["fp32 dense"][0]
    rows = [
        f"| cache @{context // 1024}K | bytes/token | tokens/s | vs fp32 |",
        "|---|---|---|---|",
    ]
    for name, (tps, bpt) in results.items():
        rows.append(f"| {name} | {bpt:,.1f} | {tps:.1f} | {tps / base:.2f}x |")
    return rows


RECALL_MODEL = ("num_layers=2", "d_model=128", "mlp_dim=384")  # mla-tiny-default, smaller


def train_recall_model(seq_len: int, steps: int, out_dir: str, batch: int = 16, small=True):
    """Pretrain train/configs/recall.py's setup at ``seq_len`` on a 2-layer, 128-wide
    mla-tiny-default (``RECALL_MODEL``); returns (model, train config)."""
    from train.config import load_config
    from train.pretrain import run
    from train.sample import load_model

    overrides = [f"seq_len={seq_len}", f"steps={steps}", f"batch_size={batch}",
                 f"warmup_steps={max(1, steps // 10)}", f"run_dir={out_dir}",
                 "tensorboard=false", "plot=false", f"eval_every={steps}",
                 f"ckpt_every={steps}", "async_checkpoint=false",
                 *(f"model.{o}" for o in (RECALL_MODEL if small else ()))]  # fmt: skip
    config = load_config("recall", overrides)
    run(config)
    return load_model(out_dir)[0], config


def recall_table(model, config, settings: dict, rows: int) -> list[str]:
    """Table 3 rows: held-out recall accuracy per cache setting."""
    from flax import nnx

    from train.data import make_loaders

    _, held = make_loaders(dataclasses.replace(config, batch_size=rows))
    batch = held.batch(0)
    tokens = jnp.asarray(batch["inputs_BT"])
    targets, weights = batch["targets_BT"], batch["weights_BT"]
    prefill = int(np.argmax(weights[0] > 0))  # the pairs: everything before the first query

    @nnx.jit(static_argnums=2)
    def answers(model, tokens, fields):
        cache = model.init_cache(tokens.shape[0], tokens.shape[1], jnp.float32,
                                 **({} if fields is None else {"cache": dict(fields)}))  # fmt: skip
        first, cache = model.decode(tokens[:, :prefill], cache)

        def step(cache, tok_B):
            logits, cache = model.decode(tok_B[:, None], cache)
            return cache, jnp.argmax(logits[:, 0], -1)

        _, rest = jax.lax.scan(step, cache, tokens[:, prefill:].T)
        return jnp.concatenate([jnp.argmax(first, -1), rest.T], 1)

    out = [f"| cache (recall, seq_len {tokens.shape[1]}, {prefill} prompt tokens) | accuracy | "
           "vs fp32 |", "|---|---|---|"]  # fmt: skip
    base = None
    for name, fields in settings.items():
        key = None if fields is None else tuple(sorted(fields.items()))
        pred = np.asarray(answers(model, tokens, key))
        acc = float((pred == targets)[weights > 0].mean())
        base = acc if base is None else base
        ratio = f"{acc / base:.3f}" if base else "-"
        out.append(f"| {name} | {acc:.4f} | {ratio} |")
    return out


def main(argv=None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_quant", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--budget-gib", type=float, default=16.0)
    p.add_argument("--context", type=int, default=32768, help="decode context")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recall-seq-len", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=2500)
    p.add_argument("--recall-rows", type=int, default=256)
    p.add_argument("--checkpoint", default=None, help="a trained recall run (skip training)")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.context, args.steps, args.repeats = [8192], 1024, 2, 1
        args.recall_seq_len, args.train_steps, args.recall_rows = 64, 4, 8
    configure_cpu()
    print("\n".join(bytes_table(args.contexts, args.budget_gib)), flush=True)
    print()
    print("\n".join(decode_table(args.context, args.steps, args.repeats)), flush=True)
    print()
    settings = {
        "fp32 dense": None,
        "kivi-2 G32 R128 (target)": kivi(2),
        "kivi-2 G8 R8": kivi(2, 8, 8),
        "kivi-3 G8 R8": kivi(3, 8, 8),
        "kivi-4 G8 R8": kivi(4, 8, 8),
    }
    if args.quick:
        settings = {"fp32 dense": None, "kivi-2 G8 R8": kivi(2, 8, 8)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            from train.config import load_config
            from train.sample import load_model

            model = load_model(args.checkpoint)[0]
            config = load_config("recall", [f"seq_len={args.recall_seq_len}"])
        else:
            out = os.path.join(tmp, "recall")
            model, config = train_recall_model(args.recall_seq_len, args.train_steps, out, batch=32)
        print("\n".join(recall_table(model, config, settings, args.recall_rows)), flush=True)


if __name__ == "__main__":
    main()
