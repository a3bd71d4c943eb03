"""Optimizer-state memory and step time of jaxattn.optim's low-rank methods vs AdamW.

1. **State bytes** at the GaLore paper's LLaMA configs (60M r128, 130M r256, 350M r256,
   1B r512, 7B r1024; vocab 32000; configs from github.com/jiaweizzhao/GaLore), exact: the
   sum over the leaves of ``jax.eval_shape(tx.init, params)`` (nothing is allocated). As in
   the paper (``target_modules = ["attn", "mlp"]``), the attention and MLP matrices are
   projected; embeddings, LM head and norms get the inner Adam in full. Rows: AdamW (fp32
   moments) = 100%, AdamW 8-bit, GaLore (fp32; and with bf16 projectors), GaLore 8-bit, Fira,
   GaLore-DCT, GradNormLoRP (``g``/``V`` pairs), LoRA at the same rank (frozen base, adapters
   B [in, r], A [r, out] + embeddings/head/norms trained with AdamW) and low-rank W = BA with
   refactorisation (the same states as LoRA, plus a step count), SLTrain (AdamW on B, A and
   S's values at density 0.03) and SST (full-spectrum U, s, Vᵀ; AdamW moments for the r
   sampled vectors and all of s, plus the sampled indices). The column "matrices" is the
   same ratio over the projected matrices only (embeddings excluded).
2. **Step time** on the default model's parameter shapes (``mla-tiny-default``: d_model 256,
   4 layers, mlp 768, MLA L = 64; shapes written out here, not imported), T = 200: the
   median over ``--repeats`` alternating rounds of ``--steps`` optimizer steps (update +
   apply; JAX: one jitted ``lax.scan``) from step 0, so exactly one projector refresh per
   200 steps, beside AdamW, and galore-torch's ``GaLoreAdamW`` / ``torch.optim.AdamW`` on
   the same matrix views in the same run (``--no-torch`` to skip). This is the optimizer
   alone: a training step adds the forward and backward pass (BENCHMARKS.md: ~340 ms for the
   default model at batch 16 x 128 on the 2-core VM), which the "+ms" column is added to.

3. **Pretraining comparison** (``--pretrain-steps``, default 300; 0 skips it): AdamW, GaLore,
   Fira, GaLore-DCT, SLTrain, SST and low-rank + refactorisation at rank d/4 train the same
   tiny model on the built-in corpus with the same steps and tokens, each at every lr of
   ``--pretrain-lrs`` (best per method reported, and the common lr 2e-3); final eval loss table and
   train-loss curves written under ``--out`` (``pretrain.md``, ``pretrain_loss.png``). See
   ``benchmarks/_optim_pretrain.py``.

Usage: ``python -m benchmarks.optim [--steps 200] [--repeats 3] [--no-torch] [--bytes-only]
[--pretrain-steps 300] [--pretrain-lrs 1e-3,...,2e-2] [--out runs/bench_optim]``
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattn import optim

# name: (d_model, mlp, layers, GaLore rank); vocab 32000 for all
LLAMA = {
    "60M": (512, 1376, 8, 128),
    "130M": (768, 2048, 12, 256),
    "350M": (1024, 2736, 24, 256),
    "1B": (2048, 5461, 24, 512),
    "7B": (4096, 11008, 32, 1024),
}
VOCAB = 32000
PROJECTED = ("/attn/", "/mlp/")


def llama_shapes(d: int, f: int, layers: int, vocab: int = VOCAB) -> dict:
    """Parameter shapes of a LLaMA decoder in the ``[in, out]`` layout."""
    layer = {
        "attn": {k: (d, d) for k in ("q", "k", "v", "o")},
        "mlp": {"gate": (d, f), "up": (d, f), "down": (f, d)},
        "attn_norm": (d,),
        "mlp_norm": (d,),
    }
    return {
        "embed": (vocab, d),
        "layers": {str(i): layer for i in range(layers)},
        "final_norm": (d,),
        "lm_head": (d, vocab),
    }


def default_model_shapes() -> dict:
    """``mla-tiny-default``'s parameter shapes (vocab 256, d 256, 4 layers, 4 heads, mlp 768,
    kv_lora 64, qk nope 32 + rope 16, v 32) and each leaf's fan-in dims (``o`` has two)."""
    d, n, lat = 256, 4, 64
    layer = {
        "attn": {
            "q": (d, n, 48),
            "kv_a": (d, lat + 16),
            "kv_norm": (lat,),
            "k_b": (lat, n, 32),
            "v_b": (lat, n, 32),
            "o": (n, 32, d),
        },
        "mlp": {"gate": (d, 768), "up": (d, 768), "down": (768, d)},
        "attn_norm": (d,),
        "mlp_norm": (d,),
    }
    return {
        "embed": (256, d),
        "layers": {str(i): layer for i in range(4)},
        "final_norm": (d,),
        "lm_head": (d, 256),
    }


def _structs(shapes, dtype=jnp.float32):
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )


def _projected(path: str) -> bool:
    return any(p in f"/{path}" for p in PROJECTED)


def fan_in(path: str, shape) -> int:
    return 2 if path.endswith("attn/o") and len(shape) == 3 else 1


def state_bytes(tx, params, select=None) -> int:
    """Exact bytes of ``tx.init(params)``'s leaves (of the params' subtrees ``select`` keeps,
    when given: a predicate on the state leaf's parameter path)."""
    return leaf_bytes(jax.eval_shape(tx.init, params), select)


def leaf_bytes(state, select=None) -> int:
    """Bytes of the leaves of ``state`` (arrays or ShapeDtypeStructs; ``select``: as in
    :func:`state_bytes`)."""
    if select is None:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        keys = jax.tree_util.keystr(path, simple=True, separator="/")
        if select(keys):
            total += x.size * x.dtype.itemsize
    return total


def lora_params(shapes, rank: int, factors=("b", "a")) -> dict:
    """The trainable leaves of LoRA / W = BA at ``rank``: each projected matrix ``[m, n]``
    becomes ``{b: [m, r], a: [r, n]}``; everything else stays."""

    def one(path, s):
        p = jax.tree_util.keystr(path, simple=True, separator="/")
        if _projected(p) and len(s) == 2:
            return {factors[0]: (s[0], rank), factors[1]: (rank, s[1])}
        return s

    return jax.tree_util.tree_map_with_path(one, shapes, is_leaf=lambda s: isinstance(s, tuple))


def wn_params(shapes) -> dict:
    """GradNormLoRP's leaves: each projected matrix ``[m, n]`` becomes ``{g: [n], v: [m, n]}``."""

    def one(path, s):
        p = jax.tree_util.keystr(path, simple=True, separator="/")
        return {"g": (s[1],), "v": s} if _projected(p) and len(s) == 2 else s

    return jax.tree_util.tree_map_with_path(one, shapes, is_leaf=lambda s: isinstance(s, tuple))


def form_params(shapes, form: str, rank: int, density: float = 0.03) -> dict:
    """The leaves of the weight forms (``jaxattn.layers.factorize``): each projected matrix
    ``[m, n]`` becomes SLTrain's ``{b: [m, r], a: [r, n], s: [int(density m n)]}`` or SST's
    full spectrum ``{u: [m, k], s: [k], vt: [k, n]}`` (k = min(m, n))."""

    def one(path, sh):
        p = jax.tree_util.keystr(path, simple=True, separator="/")
        if not (_projected(p) and len(sh) == 2):
            return sh
        m, n = sh
        if form == "sltrain":
            return {"b": (m, rank), "a": (rank, n), "s": (int(density * m * n),)}
        k = min(m, n)
        return {"u": (m, k), "s": (k,), "vt": (k, n)}

    return jax.tree_util.tree_map_with_path(one, shapes, is_leaf=lambda s: isinstance(s, tuple))


def memory_rows(name: str):
    """``(method, bytes, bytes of the projected matrices' states)`` rows for one config."""
    d, f, layers, r = LLAMA[name]
    shapes = llama_shapes(d, f, layers)
    params = _structs(shapes)
    rule = lambda path, shape: r if _projected(path) and len(shape) == 2 else None
    adam = optax.adamw(1e-3)
    gal = dict(rank=rule, update_proj_gap=200, scale=0.25)
    mats = lambda p: _projected(p)
    txs = {
        "AdamW": (adam, params),
        "AdamW 8-bit": (optim.quantize_state(adam), params),
        "GaLore": (optim.galore(optax.scale_by_adam(), **gal), params),
        "GaLore, bf16 projectors": (
            optim.galore(optax.scale_by_adam(), **gal, projector_dtype=jnp.bfloat16),
            params,
        ),
        "GaLore 8-bit": (optim.galore(optax.scale_by_adam(), **gal, moment_bits=8), params),
        "Fira": (optim.fira(optax.scale_by_adam(), **gal), params),
        "GaLore-DCT": (optim.galore(optax.scale_by_adam(), **gal, projector="dct"), params),
        "GradNormLoRP": (
            optim.gradnormlorp(optax.scale_by_adam(), rank=r, update_proj_gap=200),
            _structs(wn_params(shapes)),
        ),
        f"LoRA r{r}": (adam, _structs(lora_params(shapes, r))),
        f"low-rank BA r{r} + refactor": (
            optim.lowrank_refactor(adam, every=1000),
            _structs(lora_params(shapes, r)),
        ),
        f"SLTrain r{r}, density 0.03": (adam, _structs(form_params(shapes, "sltrain", r))),
        f"SST, {r} sampled of full k": (
            optim.sst(adam, rank=r, every=200),
            _structs(form_params(shapes, "sst", r)),
        ),
    }
    states = {k: jax.eval_shape(tx.init, p) for k, (tx, p) in txs.items()}  # traced once each
    return [(k, leaf_bytes(st), leaf_bytes(st, mats)) for k, st in states.items()]


def print_memory(names) -> dict:
    out = {}
    for name in names:
        rows = memory_rows(name)
        base, base_m = rows[0][1], rows[0][2]
        print(
            f"\nLLaMA {name} (rank {LLAMA[name][3]}): optimizer-state bytes vs AdamW (fp32 moments)"
        )
        print(f"  {'method':30s} {'GiB':>9s} {'% AdamW':>8s} {'matrices':>9s}")
        for method, b, bm in rows:
            print(
                f"  {method:30s} {b / 2**30:9.3f} {100 * b / base:7.1f}% {100 * bm / base_m:8.1f}%"
            )
            out[(name, method)] = (b / base, bm / base_m)
    return out


def _jax_runner(tx, params, grads, steps):
    """A function timing one call of ``steps`` steps (compiled and warmed up here)."""

    @jax.jit
    def run(params, state):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), None, length=steps)[0]

    state = tx.init(params)
    jax.block_until_ready(run(params, state))

    def timed():
        t0 = time.perf_counter()
        jax.block_until_ready(run(params, state))  # from step 0: one refresh per call
        return (time.perf_counter() - t0) / steps

    return timed


def _torch_runner(make, params_np, grads_np, steps):
    """The same for a torch optimizer (its state is created by one untimed step)."""
    import torch

    ps = [torch.nn.Parameter(torch.tensor(p)) for p in params_np]
    for p, g in zip(ps, grads_np):
        p.grad = torch.tensor(g)
    opt = make(ps)
    opt.step()

    def timed():
        for group in opt.param_groups:  # restart GaLore's count: one refresh per call
            for p in group["params"]:
                if "projector" in opt.state[p]:
                    opt.state[p]["step"] = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        return (time.perf_counter() - t0) / steps

    return timed


def print_step_time(steps: int, repeats: int, with_torch: bool) -> dict:
    shapes = default_model_shapes()
    key = jax.random.key(0)
    params = jax.tree.map(
        lambda s: 0.02 * jax.random.normal(key, s), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )
    grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.fold_in(key, p.size), p.shape), params
    )

    def rule(path, shape):
        if not _projected(path) or len(shape) < 2:
            return None
        m = math.prod(shape[: fan_in(path, shape)])
        return min(64, min(m, math.prod(shape) // m) // 2)  # d/4, at most half the smaller side

    gal = dict(rank=rule, update_proj_gap=steps, scale=0.25, fan_in_axes=fan_in)
    inner = optim.scale_by_adam_galore_torch()
    lr = optax.scale(-1e-3)
    txs = {
        "AdamW (optax)": optax.adamw(1e-3, weight_decay=0.0),
        "GaLore SVD": optax.chain(optim.galore(inner, **gal), lr),
        "GaLore randomized": optax.chain(optim.galore(inner, **gal, projector="randomized"), lr),
        "GaLore DCT": optax.chain(optim.galore(inner, **gal, projector="dct"), lr),
        "GaLore 8-bit": optax.chain(optim.galore(inner, **gal, moment_bits=8), lr),
        "Fira": optax.chain(optim.fira(inner, **gal), lr),
    }
    runners = {k: _jax_runner(tx, params, grads, steps) for k, tx in txs.items()}
    if with_torch:
        import galore_torch
        import torch

        from jaxattn.optim._plan import flatten

        paths, ps, _ = flatten(params)
        mats = [(p, rule(p, x.shape)) for p, x in zip(paths, ps)]
        # galore-torch sees each leaf as the same matrix view ([*in] x [*out] flattened)
        view = lambda p, x: np.asarray(x).reshape(math.prod(x.shape[: fan_in(p, x.shape)]), -1)
        p_np = [view(p, x) for p, x in zip(paths, ps)]
        g_np = [view(p, x) for p, x in zip(paths, jax.tree.leaves(grads))]

        def galore_opt(tparams):
            groups = {}
            for (_, r), t in zip(mats, tparams):
                groups.setdefault(r, []).append(t)
            pg = [{"params": groups.pop(None, [])}]
            for r, v in groups.items():
                gap = {"update_proj_gap": steps, "scale": 0.25, "proj_type": "std"}
                pg.append({"params": v, "rank": r, **gap})
            return galore_torch.GaLoreAdamW(pg, lr=1e-3, no_deprecation_warning=True)

        runners["galore-torch GaLoreAdamW"] = _torch_runner(galore_opt, p_np, g_np, steps)
        runners["torch.optim.AdamW"] = _torch_runner(
            lambda t: torch.optim.AdamW(t, lr=1e-3, weight_decay=0.0), p_np, g_np, steps
        )
        print(f"\n(torch threads: {torch.get_num_threads()})")
    rounds = {k: [] for k in runners}
    for _ in range(repeats):  # alternate, so a slow spell of a shared machine hits all alike
        for k, timed in runners.items():
            rounds[k].append(timed())
    times = {k: statistics.median(v) for k, v in rounds.items()}
    base = times["AdamW (optax)"]
    print(f"\nStep time, default-model shapes, T = {steps}: median of {repeats} alternating rounds")
    print(f"  {'optimizer':28s} {'ms/step':>9s} {'x AdamW':>8s} {'+ms vs AdamW':>13s}")
    for k, t in times.items():
        print(f"  {k:28s} {1e3 * t:9.3f} {t / base:8.2f} {1e3 * (t - base):13.3f}")
    if "galore-torch GaLoreAdamW" in times:
        ratio = times["galore-torch GaLoreAdamW"] / times["GaLore SVD"]
        print(f"  GaLore SVD is {ratio:.2f}x galore-torch's step speed")
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="T, and the steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--bytes-only", action="store_true")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="0: no pretraining runs")
    ap.add_argument(
        "--pretrain-lrs", default="1e-3,2e-3,5e-3,1e-2,2e-2",
        help="the lr grid each method of the pretraining comparison trains on (best reported)",
    )  # fmt: skip
    ap.add_argument("--out", default=os.path.join("runs", "bench_optim"))
    args = ap.parse_args(argv)
    print_memory(list(LLAMA))
    if not args.bytes_only:
        print_step_time(args.steps, args.repeats, not args.no_torch)
        if args.pretrain_steps > 0:
            from benchmarks import _optim_pretrain

            lrs = tuple(float(x) for x in args.pretrain_lrs.split(","))
            _optim_pretrain.run(args.pretrain_steps, args.out, lrs=lrs)


if __name__ == "__main__":
    main()
