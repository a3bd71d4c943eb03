"""Decode cost of MHA, GQA (K=8), MQA and MLA (L=512, P=64) models of the same width, in one run.

All four share d_model = 4096 and 32 query heads of width 128 (MLA: qk_nope 128, v 128,
kv_lora_rank L = 512, qk_rope_head_dim P = 64, no query compression); everything else (MLP,
vocabulary, layers) is identical and deliberately small so the attention and its cache
dominate. For each context length the cache is filled to that length and the jitted one-token
decode step of ``models.DecoderLM.decode`` (MLA: absorbed, over the latent cache) is timed.

Printed per model: cache bytes per token per layer and its ratio to GQA (MLA's target is
(L + P) / (2·K·H) = 576 / 2048 = 0.281), then decode tokens/s at each context and its ratio
to GQA. The dense caches' decoding is bound by reading the cache; MLA's, on CPU, by its matmul
FLOPs (32 heads × (576 + 576) per cached token vs 32 × 256 for GQA), on accelerators by cache
reads too. Each point is the median of ``--repeats`` runs of ``steps`` decode steps in one
jitted loop over a donated cache (compilation and the cache fill are not timed).

  python -m benchmarks.decode                 # contexts 1K..32K, batch 8, 2 layers
  python -m benchmarks.decode --quick         # contexts 1K..8K, batch 4, 1 layer (CPU-friendly)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from models import DecoderLM, ModelConfig
from train.platform import configure_cpu

WIDTH = dict(d_model=4096, num_heads=32, head_dim=128)


def configs(layers: int, dtype) -> dict[str, ModelConfig]:
    """The four same-width models."""
    common = dict(vocab_size=256, num_layers=layers, mlp_dim=512, dtype=dtype, param_dtype=dtype)
    mha = dict(common, **WIDTH)
    return {
        "MHA (K=32)": ModelConfig(num_kv_heads=32, **mha),
        "GQA (K=8)": ModelConfig(num_kv_heads=8, **mha),
        "MQA (K=1)": ModelConfig(num_kv_heads=1, **mha),
        "MLA (L=512,P=64)": ModelConfig(
            arch="deepseek_v3",
            attention="mla",
            d_model=4096,
            num_heads=32,
            q_lora_rank=0,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            **common,
        ),
    }


def decode_tokens_per_s(
    model: DecoderLM, batch: int, context: int, steps: int, repeats: int = 3
) -> float:
    """Tokens/s of the jitted single-token decode step with ``context`` cached positions.

    The median over ``repeats`` timed runs of ``steps`` steps (each on a freshly filled cache).
    """
    graphdef, state = nnx.split(model)

    def filled_cache():
        cache = model.init_cache(batch, context + steps + 1)
        cache = tuple(c.with_lengths(jnp.full((batch,), context, jnp.int32)) for c in cache)
        return jax.block_until_ready(cache)

    # The cache is donated, as in a serving loop that owns it: the steps update it in place
    # instead of first copying the whole cache (which would be timed as part of the steps).
    @functools.partial(jax.jit, donate_argnums=1)
    def run(state, cache, tok_B):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            cache, tok_B = carry
            logits, cache = m.decode(tok_B[:, None], cache)
            return cache, jnp.argmax(logits[:, 0], -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, tok_B))

    tok_B = jnp.zeros((batch,), jnp.int32)
    jax.block_until_ready(run(state, filled_cache(), tok_B))  # compile + warm up
    times = []
    for _ in range(repeats):
        cache = filled_cache()
        start = time.perf_counter()
        jax.block_until_ready(run(state, cache, tok_B))
        times.append(time.perf_counter() - start)
    return batch * steps / statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="contexts 1K-8K, batch 4, 1 layer")
    p.add_argument("--contexts", default=None, help="comma-separated cached lengths")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="decode steps timed per point")
    p.add_argument("--dtype", default=None, help="default bfloat16 (float32 on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    p.add_argument(
        "--no-cpu-tuning",
        action="store_true",
        help="skip train.platform.configure_cpu (which train.sample applies)",
    )
    a = p.parse_args(argv)
    tuned = False if a.no_cpu_tuning else configure_cpu()  # before JAX starts its backends
    contexts = [1024, 4096, 8192] if a.quick else [1024, 2048, 4096, 8192, 16384, 32768]
    if a.contexts:
        contexts = [int(c) for c in a.contexts.split(",")]
    batch = a.batch or (4 if a.quick else 8)
    layers = a.layers or (1 if a.quick else 2)
    steps = a.steps or (4 if a.quick else 32)
    # bf16 matmuls are emulated (slow) on CPU, which would hide the attention costs
    dtype = jnp.dtype(a.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {dtype.name}, "
        f"batch {batch}, layers {layers}, {steps} decode steps per run, "
        f"median of {a.repeats} runs per point, XLA CPU tuning {'on' if tuned else 'off'}"
    )

    rows = {}
    for name, cfg in configs(layers, dtype).items():
        model = DecoderLM(cfg, rngs=nnx.Rngs(0))
        per_layer = model.cache_bytes_per_token() // layers
        speeds = [decode_tokens_per_s(model, batch, c, steps, a.repeats) for c in contexts]
        rows[name] = (per_layer, speeds)
        del model

    ref_bytes, ref_speeds = rows["GQA (K=8)"]
    ctx = [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts]
    print(
        f"\n{'model':<18}{'cache B/token/layer':>20}{'vs GQA':>8}  "
        + "".join(f"{'tok/s@' + c:>12}" for c in ctx)
    )
    for name, (nbytes, speeds) in rows.items():
        print(
            f"{name:<18}{nbytes:>20,}{nbytes / ref_bytes:>8.3f}  "
            + "".join(f"{s:>12.1f}" for s in speeds)
        )
    print(f"\n{'speed vs GQA':<18}{'':>28}  " + "".join(f"{c:>12}" for c in ctx))
    for name, (_, speeds) in rows.items():
        print(
            f"{name:<18}{'':>28}  "
            + "".join(f"{s / r:>12.2f}" for s, r in zip(speeds, ref_speeds, strict=True))
        )
    target = (512 + 64) / (2 * 8 * 128)
    got = rows["MLA (L=512,P=64)"][0] / ref_bytes
    print(f"\nMLA/GQA cache bytes: {got:.4f} (target (L+P)/(2·K·H) = {target:.4f})")


if __name__ == "__main__":
    main()
