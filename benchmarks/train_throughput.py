"""Training throughput (tokens/s) of the default model vs Hugging Face LlamaForCausalLM in torch.

One run, same machine, same batch (B x T byte tokens), AdamW with clipping on both sides:

* jaxattn ``mla-tiny-default`` through ``train.step`` (the real train step, fp32, one device);
* jaxattn ``DecoderLM`` with Llama attention at the same dims (isolates MLA vs MHA);
* ``transformers.LlamaForCausalLM`` (torch CPU, fp32, eager attention) with the same width,
  depth, heads, MLP and vocab.

JAX runs with the CPU tuning the training entry points apply (``train.platform.configure_cpu``).
Each row also prints its model-FLOPs utilisation (``train.metrics``: 6 x params + attention,
over the CPU peak estimate), each model with its own parameter count.

Usage: ``python benchmarks/train_throughput.py [--batch 16] [--seq 128] [--steps 20]``
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from jaxattn.sharding import make_mesh
from models import DecoderLM, get_config
from train.config import TrainConfig
from train.data import WindowLoader, load_tokens
from train.metrics import flops_per_token, peak_flops
from train.platform import configure_cpu
from train.step import make_trainer


def jax_tokens_per_s(model_config, batch, seq, steps, tokens_N) -> tuple[float, int]:
    """tokens/s of ``steps`` timed train steps (after one compile step), and the param count."""
    from flax import nnx

    config = TrainConfig(seq_len=seq, batch_size=batch, steps=steps + 10, warmup_steps=1)
    trainer = make_trainer(
        lambda: DecoderLM(model_config, rngs=nnx.Rngs(0)),
        config,
        make_mesh({"data": 1}, jax.devices()[:1]),
    )
    loader = WindowLoader(tokens_N, seq_len=seq, global_batch=batch)
    state, rest = trainer.init()
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    state, m = trainer.train_step(state, rest, trainer.put_batch(loader.batch(0)))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        state, m = trainer.train_step(state, rest, trainer.put_batch(loader.batch(step)))
    jax.block_until_ready(m)
    return batch * seq * steps / (time.perf_counter() - t0), params


def torch_tokens_per_s(model_config, batch, seq, steps, tokens_N) -> tuple[float, int]:
    """tokens/s of HF LlamaForCausalLM training at the same dims, and its param count."""
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
        num_key_value_heads=model_config.num_heads,
        max_position_embeddings=model_config.max_seq_len,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(hf_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    loader = WindowLoader(tokens_N, seq_len=seq, global_batch=batch)

    def step(i):
        ids = torch.from_numpy(loader.batch(i)["inputs_BT"]).long()
        out = model(input_ids=ids, labels=ids)  # HF shifts the labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    params = sum(p.numel() for p in model.parameters())
    return batch * seq * steps / (time.perf_counter() - t0), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    tuned = configure_cpu()  # what train.pretrain does before its first computation
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
    rows = [
        ("jaxattn mla-tiny-default (MLA)",)
        + jax_tokens_per_s(mla, args.batch, args.seq, args.steps, tokens_N),
        ("jaxattn DecoderLM, Llama attn",)
        + jax_tokens_per_s(llama, args.batch, args.seq, args.steps, tokens_N),
        ("HF LlamaForCausalLM (torch)",)
        + torch_tokens_per_s(llama, args.batch, args.seq, args.steps, tokens_N),
    ]
    ref = rows[-1][1]
    peak, peak_label = peak_flops()
    configs = (mla, llama, llama)
    print(
        f"\ntraining throughput, {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
        f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps, fp32, AdamW; "
        f"XLA CPU tuning {'on' if tuned else 'off'}; MFU vs {peak_label}"
    )
    print(f"| {'model':34s} | {'params':>9s} | {'tokens/s':>9s} | {'vs torch':>8s} | {'MFU':>6s} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 8}|")
    for (name, tok_s, params), cfg in zip(rows, configs, strict=True):
        mfu = tok_s * flops_per_token(params, cfg, args.seq) / peak
        print(
            f"| {name:34s} | {params / 1e6:8.2f}M | {tok_s:9.0f} | {tok_s / ref:7.2f}x "
            f"| {100 * mfu:5.1f}% |"
        )


if __name__ == "__main__":
    main()
