"""Training throughput (tokens/s) of the default model vs Hugging Face LlamaForCausalLM in torch.

One run, same machine, same batch (B x T byte tokens), AdamW with clipping on both sides:

* jaxattn ``mla-tiny-default`` through ``train.step`` (the real train step, fp32, one device);
* jaxattn ``DecoderLM`` with Llama attention at the same dims (isolates MLA vs MHA);
* ``transformers.LlamaForCausalLM`` (torch CPU, fp32, eager attention) with the same width,
  depth, heads, MLP and vocab.

JAX runs with the CPU tuning the training entry points apply (``train.platform.configure_cpu``).
Each row also prints its model-FLOPs utilisation (``train.metrics``: 6 x params + attention,
over the CPU peak estimate), each model with its own parameter count.

Each model is compiled and warmed up first; then ``--rounds`` rounds each time ``--steps``
steps of every model in turn, so a slow spell of a shared machine hits all three alike. The
table gives the median tokens/s, its ratio to torch's median, and the range of the per-round
ratios (each model against torch in the same round).

The jaxattn models run their steps as ``train.loop`` does: ``--steps-per-call`` steps per
compiled call (``TrainConfig.steps_per_call``, default 10; pass 1 for one call per step).

Usage: ``python -m benchmarks.train_throughput [--batch 16] [--seq 128] [--steps 10]
[--rounds 5] [--steps-per-call 10] [--no-cpu-tuning]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxattn.sharding import make_mesh
from models import DecoderLM, get_config
from train.config import TrainConfig
from train.data import WindowLoader, load_tokens
from train.metrics import flops_per_token, peak_flops
from train.platform import configure_cpu
from train.step import make_trainer


def build_trainer(model_config, batch, seq, tokens_N, steps_per_call, optimizer=None):
    """``(trainer, loader, state, rest)``: the real train step of ``model_config`` on one device
    (``optimizer`` rules, default ``TrainConfig``'s), its data loader and a fresh state."""
    from flax import nnx

    extra = {} if optimizer is None else {"optimizer": optimizer}
    config = TrainConfig(seq_len=seq, batch_size=batch, steps=10**6, warmup_steps=1,
                         steps_per_call=steps_per_call, **extra)  # fmt: skip
    trainer = make_trainer(
        lambda: DecoderLM(model_config, rngs=nnx.Rngs(0)),
        config,
        make_mesh({"data": 1}, jax.devices()[:1]),
    )
    loader = WindowLoader(tokens_N, seq_len=seq, global_batch=batch)
    state, rest = trainer.init()
    return trainer, loader, state, rest


def jax_runner(
    model_config, batch, seq, tokens_N, steps_per_call
) -> tuple[Callable[[int], float], int]:
    """A function timing ``n`` train steps of the jaxattn model (compiled and warmed up), and
    the parameter count. Steps go in calls of ``steps_per_call`` (``Trainer.train_steps``)
    and single steps for a remainder, as ``train.loop`` runs them."""
    trainer, loader, state, rest = build_trainer(model_config, batch, seq, tokens_N, steps_per_call)
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    box = {"state": state, "step": 0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        done = 0
        while done < n:
            k = steps_per_call if n - done >= steps_per_call > 1 else 1
            batches = [loader.batch(box["step"] + i) for i in range(k)]
            if k == 1:
                box["state"], m = trainer.train_step(
                    box["state"], rest, trainer.put_batch(batches[0])
                )
            else:
                stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
                box["state"], m = trainer.train_steps(
                    box["state"], rest, trainer.put_batches(stacked)
                )
            box["step"] += k
            done += k
        jax.block_until_ready(m)
        return time.perf_counter() - t0

    run(steps_per_call if steps_per_call > 1 else 2)  # compile and warm up
    run(1)
    return run, params


def hf_llama(model_config, num_kv_heads: int | None = None):
    """HF ``LlamaForCausalLM`` (torch, fp32, eager attention, untied head) at the dims of
    ``model_config``, seeded (torch.manual_seed(0)) and using every core."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_config = LlamaConfig(
        vocab_size=model_config.vocab_size,
        hidden_size=model_config.d_model,
        intermediate_size=model_config.mlp_dim,
        num_hidden_layers=model_config.num_layers,
        num_attention_heads=model_config.num_heads,
        num_key_value_heads=num_kv_heads or model_config.num_heads,
        max_position_embeddings=model_config.max_seq_len,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(hf_config)


def torch_train_runner(model, params: list, loader) -> Callable[[int], float]:
    """``run(n)``: n torch training steps (AdamW over ``params`` with the jaxattn trainer's
    hyper-parameters, grad-norm clip 1.0) on ``loader``'s batches, timed; warmed up by 2."""
    import torch

    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    box = {"step": 0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            box["step"] += 1
            ids = torch.from_numpy(loader.batch(box["step"])["inputs_BT"]).long()
            out = model(input_ids=ids, labels=ids)  # HF shifts the labels itself
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    run(2)  # warm up
    return run


def torch_runner(model_config, batch, seq, tokens_N) -> tuple[Callable[[int], float], int]:
    """The same for HF LlamaForCausalLM (torch, CPU) at the same dims."""
    model = hf_llama(model_config)
    params = list(model.parameters())
    loader = WindowLoader(tokens_N, seq_len=seq, global_batch=batch)
    return torch_train_runner(model, params, loader), sum(p.numel() for p in params)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="train steps timed per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (median reported)")
    parser.add_argument(
        "--steps-per-call",
        type=int,
        default=TrainConfig.steps_per_call,
        help="jaxattn train steps per compiled call, as train.pretrain runs them "
        "(TrainConfig.steps_per_call; 1 = one call per step)",
    )
    parser.add_argument(
        "--no-cpu-tuning",
        action="store_true",
        help="skip train.platform.configure_cpu (which train.pretrain applies)",
    )
    args = parser.parse_args(argv)
    # what train.pretrain does before its first computation
    tuned = False if args.no_cpu_tuning else configure_cpu()
    tokens_N = load_tokens("builtin")
    mla = get_config("mla-tiny-default")
    llama = get_config(
        "llama-tiny",
        d_model=mla.d_model,
        num_layers=mla.num_layers,
        num_heads=mla.num_heads,
        num_kv_heads=mla.num_heads,
        mlp_dim=mla.mlp_dim,
        max_seq_len=mla.max_seq_len,
    )
    names = (
        "jaxattn mla-tiny-default (MLA)",
        "jaxattn DecoderLM, Llama attn",
        "HF LlamaForCausalLM (torch)",
    )
    configs = (mla, llama, llama)
    makers = (jax_runner, jax_runner, torch_runner)
    extra = ((args.steps_per_call,), (args.steps_per_call,), ())
    runners = [
        make(cfg, args.batch, args.seq, tokens_N, *more)
        for make, cfg, more in zip(makers, configs, extra, strict=True)
    ]
    # Rounds alternate the three models, so a slow spell of the machine hits all of them.
    tokens = args.batch * args.seq * args.steps
    rates = [[] for _ in runners]
    for _ in range(args.rounds):
        for rate, (run, _) in zip(rates, runners, strict=True):
            rate.append(tokens / run(args.steps))
    ref = rates[-1]
    peak, peak_label = peak_flops()
    print(
        f"\ntraining throughput, {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
        f"batch {args.batch} x {args.seq} tokens, fp32, AdamW; median of {args.rounds} rounds "
        f"of {args.steps} steps, the models alternating; jaxattn steps per call "
        f"{args.steps_per_call}; XLA CPU tuning "
        f"{'on' if tuned else 'off'}; MFU vs {peak_label}"
    )
    print(
        f"| {'model':34s} | {'params':>9s} | {'tokens/s':>9s} | {'vs torch':>8s} "
        f"| {'per round':>11s} | {'MFU':>6s} |"
    )
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 13}|{'-' * 8}|")
    for name, rate, (_, params), cfg in zip(names, rates, runners, configs, strict=True):
        tok_s = statistics.median(rate)
        per_round = [r / t for r, t in zip(rate, ref, strict=True)]
        mfu = tok_s * flops_per_token(params, cfg, args.seq) / peak
        print(
            f"| {name:34s} | {params / 1e6:8.2f}M | {tok_s:9.0f} "
            f"| {tok_s / statistics.median(ref):7.2f}x "
            f"| {min(per_round):.2f}-{max(per_round):.2f}x | {100 * mfu:5.1f}% |"
        )


if __name__ == "__main__":
    main()
