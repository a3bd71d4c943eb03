"""Head layouts and attention kinds at equal width: one table, one run.

Every row is a ``models.DecoderLM`` of the default model's shape (d_model 256, 4 layers, 4 heads,
MLP 768, byte vocabulary; ``--d-model`` etc.) whose every layer is one attention kind:

* params: the whole model's parameter count;
* cache B/tok: ``bytes_per_token()`` of every layer's cache, summed, in bfloat16;
* score FLOPs/tok: 2·M·S·(H + V) per layer at context S = ``--train-len``, summed, read from the
  op's operands (``attention_inputs``: M query heads of width H, values of width V), so a kind
  that computes more pairs than it keeps (kdgqa / dgqa: every query head against every kv
  head) shows what it really computes; with its ratio to the "mha" row;
* train tok/s: the real train step (``train.step``, AdamW, fp32, one device) at batch 1 and
  T = ``--train-len``, median of ``--steps`` single steps after a warm-up, kinds interleaved
  over ``--rounds`` rounds (a slow spell of a shared machine hits every kind alike); with the
  ratio to "mha" in the same run;
* decode tok/s: one token per step after a context of ``--decode-context`` tokens (cache
  lengths set to it; ``--decode-steps`` steps in one jitted ``lax.scan``, as ``generate``
  loops), median of ``--rounds``;
* eval loss: ``train.pretrain.run`` on the built-in corpus for ``--pretrain-steps`` steps
  (seq 128, batch 16, the same seed and data for every kind), the held-out NLL.

MoH's row is its dense masked form: every head is computed and the router adds work, so it
costs at least MHA's time; its note gives the active-head fraction.

  python -m benchmarks.head_layouts                    # the table recorded in BENCHMARKS.md
  python -m benchmarks.head_layouts --kinds mha ccgqa --pretrain-steps 0
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from models import DecoderLM, LayerSpec, get_config

# name -> (kind, layer spec fields, note)
KINDS = {
    "mha": ("mha", {}, "baseline, K = N"),
    "gqa": ("mha", {"num_kv_heads": 2}, "K = N/2"),
    "moh": ("moh", {"num_shared_heads": 1, "top_k": 2}, "dense masked"),
    "ssa": ("ssa", {}, "temperatures"),
    "kdgqa": ("kdgqa", {"num_kv_heads": 2}, "all K·N pairs"),
    "dgqa": ("dgqa", {"num_kv_heads": 2}, "all K·N pairs"),
    "pgqa": ("pgqa", {"num_kv_heads": 2}, "K = N/2, noise in training"),
    "diffqkv": (
        "diffqkv",
        {"num_kv_heads": 1, "num_v_heads": 2, "head_dim": 32, "augmented_q_dim": 128},
        "",  # the note is built from the config
    ),
    "cca4": ("cca", {"compression": 4}, "C = 4, K = N"),
    "ccgqa4": ("cca", {"compression": 4, "num_kv_heads": 2}, "C = 4, K = N/2"),
    "lowrank_mhsa": ("lowrank_mhsa", {}, "rank D/N, 1 shared k/v head"),
    "mla": ("mla", {}, "default model"),
}


def model_config(name: str, args):
    """The ``DecoderLM`` config of row ``name`` at the benchmark's shape."""
    kind, spec, _ = KINDS[name]
    if kind == "mla":
        return get_config(
            "mla-tiny-default", d_model=args.d_model, num_layers=args.layers,
            num_heads=args.heads, mlp_dim=args.mlp, max_seq_len=args.max_len,
        )  # fmt: skip
    if kind == "diffqkv":  # value heads of the full head width, keys thinner
        spec = spec | {"v_head_dim": args.d_model // args.heads}
    return get_config(
        "llama-tiny", d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.heads, mlp_dim=args.mlp, max_seq_len=args.max_len,
        layer_pattern=(LayerSpec.of(kind, **spec),),
    )  # fmt: skip


def _note(name, config):
    kind, spec, note = KINDS[name]
    layer = config.layer_attention_config(0)
    if kind == "moh":
        return f"dense masked; active heads {layer.active_head_fraction:.0%}"
    if kind == "diffqkv":
        heads = f"K_k={layer.n_kv}·H{layer.h}, K_v={layer.n_v}·V{layer.v}"
        return f"{heads}, aug Q {layer.augmented_q_dim}"
    return note


def static_costs(model, context: int):
    """(params, cache bytes per token (bf16), score FLOPs per token at ``context``)."""
    from jaxattn.layers._context import Context

    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    caches = model.init_cache(1, 8, jnp.bfloat16)
    cache_bytes = sum(c.bytes_per_token() for c in caches)
    flops = 0
    x = jnp.zeros((1, 4, model.config.d_model), jnp.float32)
    ctx = Context.create(1, 4)
    for blk in model.layers:
        attn = blk.attn
        q, k, v = jax.eval_shape(
            lambda x, a=attn: a.attention_inputs(*a.qk_transform(*a.project(x, ctx), ctx), ctx),
            x,
        )
        m, h, vd = q.shape[2], q.shape[3], v.shape[3]
        flops += 2 * m * context * (h + vd)
    return params, cache_bytes, flops


def train_runner(config, seq: int):
    """``run(n) -> seconds`` of n real train steps at batch 1 (compiled and warmed up)."""
    from benchmarks.train_throughput import build_trainer
    from train.data import load_tokens

    tokens = load_tokens("builtin")
    trainer, loader, state, rest = build_trainer(config, 1, seq, tokens, 1)
    box = {"state": state, "step": 0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            batch = trainer.put_batch(loader.batch(box["step"]))
            box["state"], m = trainer.train_step(box["state"], rest, batch)
            box["step"] += 1
        jax.block_until_ready(m)
        return time.perf_counter() - t0

    run(2)
    return run


def decode_runner(model, context: int, steps: int):
    """``run() -> seconds`` of ``steps`` one-token decode steps after ``context`` tokens."""
    caches = model.init_cache(1, context + steps + 1, jnp.bfloat16)
    caches = tuple(c.with_lengths(jnp.asarray([context], jnp.int32)) for c in caches)
    tokens = jnp.zeros((1, steps), jnp.int32)

    @nnx.jit
    def decode(model, caches, tokens):
        def step(caches, tok_B):
            logits, caches = model.decode(tok_B[:, None], caches)
            return caches, logits[:, 0, 0]

        return jax.lax.scan(step, caches, tokens.T)[1]

    def run() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(decode(model, caches, tokens))
        return time.perf_counter() - t0

    run()
    return run


def eval_loss(config, steps: int) -> float:
    """Held-out NLL after ``steps`` pretraining steps on the built-in corpus."""
    from train import pretrain
    from train.config import TrainConfig

    with tempfile.TemporaryDirectory() as run_dir:
        tc = TrainConfig(
            name="head-layouts", run_dir=run_dir, seq_len=128, batch_size=16, steps=steps,
            warmup_steps=max(1, steps // 10), log_every=max(1, steps), eval_every=10**6,
            eval_batches=4, ckpt_every=10**6, tensorboard=False, plot=False, sample_tokens=0,
            async_checkpoint=False,
        )  # fmt: skip
        return float(pretrain.run(tc, model_config=config).eval_loss)


def parse_args(argv=None):
    """The command line's settings (``max_len``: the models' position limit; "mha" always
    first among ``kinds``, the ratios' baseline)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=768)
    p.add_argument("--train-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-context", type=int, default=32768)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=60)
    args = p.parse_args(argv)
    if "mha" not in args.kinds:
        args.kinds = ["mha", *args.kinds]
    args.max_len = max(args.train_len, args.decode_context + args.decode_steps + 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    print(f"# head layouts: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, "
          f"train T={args.train_len} (batch 1), decode after {args.decode_context} tokens, "
          f"{jax.device_count()} x {jax.devices()[0].platform}")  # fmt: skip
    rows = {}
    for name in args.kinds:
        print(f"# building {name}", file=sys.stderr, flush=True)
        config = model_config(name, args)
        model = nnx.jit(lambda c=config: DecoderLM(c, rngs=nnx.Rngs(0)))()  # one compile
        params, cache_b, flops = static_costs(model, args.train_len)
        rows[name] = dict(
            config=config, params=params, cache=cache_b, flops=flops,
            train=train_runner(config, args.train_len),
            decode=decode_runner(model, args.decode_context, args.decode_steps),
            train_s=[], decode_s=[],
        )  # fmt: skip
    for _ in range(args.rounds):  # interleaved: every kind sees the same machine
        for r in rows.values():
            r["train_s"].append(r["train"](args.steps) / args.steps)
            r["decode_s"].append(r["decode"]() / args.decode_steps)
    for name, r in rows.items():
        print(f"# pretraining {name}", file=sys.stderr, flush=True)
        r["loss"] = eval_loss(r["config"], args.pretrain_steps) if args.pretrain_steps else math.nan
    base = rows["mha"]
    print("| kind | params | cache B/tok | score FLOPs/tok | vs mha | train tok/s | vs mha | "
          f"decode tok/s @{args.decode_context} | eval loss | note |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        tr = args.train_len / statistics.median(r["train_s"])
        tr0 = args.train_len / statistics.median(base["train_s"])
        dec = 1 / statistics.median(r["decode_s"])
        print(
            f"| {name} | {r['params'] / 1e6:.3f}M | {r['cache']} | {r['flops'] / 1e6:.3g}M | "
            f"{r['flops'] / base['flops']:.2f}x | {tr:.0f} | {tr / tr0:.2f}x | {dec:.1f} | "
            f"{r['loss']:.4f} | {_note(name, r['config'])} |"
        )
    return rows


if __name__ == "__main__":
    main()
