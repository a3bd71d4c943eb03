"""benchmarks/optim.py's state bytes equal the closed forms (GaLore: m r + 2 r n per matrix)."""

import math
import pathlib
import sys

import optax

ROOT = pathlib.Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import optim as bench  # noqa: E402
from jaxattn import optim  # noqa: E402


def test_state_bytes_match_the_closed_forms():
    d, f, layers, vocab, r = 64, 96, 2, 100, 16
    shapes = bench.llama_shapes(d, f, layers, vocab)
    params = bench._structs(shapes)
    mats = [(d, d)] * 4 * layers + [(d, f), (d, f), (f, d)] * layers
    rest = 2 * vocab * d + (2 * layers + 1) * d  # embeddings, head, norms
    n_params = rest + sum(m * n for m, n in mats)
    adam = 8 * n_params + 4  # mu, nu fp32 + an int32 count
    assert bench.state_bytes(optax.scale_by_adam(), params) == adam

    rule = lambda path, shape: r if bench._projected(path) and len(shape) == 2 else None
    galore = optim.galore(optax.scale_by_adam(), rank=rule, update_proj_gap=200)
    # std: the smaller side is projected, the projector is [min, r], the moments [r, max]
    low = sum(min(m, n) * r + 2 * r * max(m, n) for m, n in mats)
    assert bench.state_bytes(galore, params) == 4 * (low + 2 * rest) + 4 + 4
    dct = optim.galore(optax.scale_by_adam(), rank=rule, update_proj_gap=200, projector="dct")
    low_dct = sum(r + 2 * r * max(m, n) for m, n in mats)  # int32 indices only
    assert bench.state_bytes(dct, params) == 4 * (low_dct + 2 * rest) + 8

    q8 = optim.quantize_state(optax.scale_by_adam(), block_size=64, min_size=4096)
    big = [s for s in [(vocab, d), (d, vocab)] + mats if math.prod(s) >= 4096]
    small = n_params - sum(math.prod(s) for s in big)
    blocks = sum(-(-math.prod(s) // 64) for s in big)
    assert (
        bench.state_bytes(q8, params)
        == 2 * (sum(math.prod(s) for s in big) + 5 * blocks) + 8 * small + 4
    )

    lora = bench._structs(bench.lora_params(shapes, r))
    assert (
        bench.state_bytes(optax.scale_by_adam(), lora)
        == 8 * (rest + sum(r * (m + n) for m, n in mats)) + 4
    )
    # SLTrain: Adam on B, A and S's values; SST: moments of the r sampled vectors (u [m, r],
    # vt [r, n]) and all of s [k], + Adam's count, SST's count, key and r indices per matrix
    sl = bench._structs(bench.form_params(shapes, "sltrain", r))
    sl_n = sum(r * (m + n) + int(0.03 * m * n) for m, n in mats)
    assert bench.state_bytes(optax.scale_by_adam(), sl) == 8 * (rest + sl_n) + 4
    sst = optim.sst(optax.scale_by_adam(), rank=r, every=200)
    sst_n = sum(r * (m + n) + min(m, n) for m, n in mats)
    sst_bytes = 8 * (rest + sst_n) + 4 + 4 + 8 + 4 * r * len(mats)
    assert bench.state_bytes(sst, bench._structs(bench.form_params(shapes, "sst", r))) == sst_bytes
    rows = {k: (b, bm) for k, b, bm in bench.memory_rows("60M")}
    assert (
        rows["GaLore 8-bit"][0]
        < rows["GaLore, bf16 projectors"][0]
        < rows["GaLore"][0]
        < rows["AdamW"][0]
    )


def test_pretraining_comparison_configs_build_every_method(tmp_path):
    """Every method of the pretraining comparison builds its trainer (abstractly: nothing is
    compiled) on the same data, steps and schedule; the factorised models hold their forms
    and SLTrain's parameter count is the formula's."""
    import jax

    from benchmarks import _optim_pretrain as pre
    from jaxattn.sharding import make_mesh
    from train.pretrain import build_model
    from train.step import make_trainer

    configs = pre.configs(4, str(tmp_path))
    assert list(configs) == list(pre.METHODS) and len(configs) == 7
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    counts, trainers = {}, {}
    for name, config in configs.items():
        model_config, model_fn = build_model(config)
        trainer = trainers[name] = make_trainer(model_fn, config, mesh)
        leaves = jax.tree_util.tree_leaves_with_path(trainer.abstract_state["params"])
        paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
        counts[name] = sum(x.size for _, x in leaves)
        assert any("/form/" in p for p in paths) == (model_config.parameterization != "dense")
        assert (config.steps, config.batch_size, config.seed) == (4, 16, 0)
    # SLTrain replaces each attention / MLP kernel [m, n] by r (m + n) + int(0.03 m n)
    infos = trainers["AdamW"].param_infos
    saved = 0
    for path, info in infos.items():
        if path.startswith("layers/") and path.endswith("/kernel"):
            m = info.fan_in
            n = math.prod(info.shape) // m
            saved += m * n - optim.form_param_count("sltrain", m, n, rank=pre.RANK, density=0.03)
    assert counts["AdamW"] - counts["SLTrain"] == saved
    assert counts["SST"] > counts["AdamW"] > counts["low-rank + refactor"]
