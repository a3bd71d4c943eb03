"""benchmarks/head_layouts.py on CPU: one tiny run prints the table (the timed runners and the
table, on the "mha" row alone); CCGQA's cache and score-FLOP ratios to MHA from the benchmark's
own ``static_costs`` at the analytic values (its numbers are a smoke test, not a measurement)."""

import pathlib
import sys

from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import head_layouts as bench  # noqa: E402

# the smallest shape with C = 4 (latent of 8) and K = N / 2; the ratios do not depend on it
ARGV = "--d-model 32 --layers 1 --heads 4 --mlp 32 --train-len 16 --steps 1 --rounds 1"
ARGV += " --decode-context 8 --decode-steps 1 --pretrain-steps 0"


def test_tiny_run_prints_the_table(capsys):
    rows = bench.main(f"--kinds mha {ARGV}".split())
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| kind | params | cache B/tok | score FLOPs/tok")
    assert [r.split(" | ")[0] for r in table[1:]] == ["| mha"]
    cells = table[1].split(" | ")
    assert cells[4] == "1.00x" and cells[6] == "1.00x", cells  # its own ratios
    assert float(cells[5]) > 0 and float(cells[7]) > 0, cells  # train and decode tok/s
    assert rows["mha"]["cache"] > 0 and len(rows["mha"]["train_s"]) == 1


def test_ccgqa_cache_and_score_flops_at_the_analytic_ratios():
    from models import DecoderLM

    args = bench.parse_args(f"--kinds ccgqa4 {ARGV}".split())
    assert args.kinds == ["mha", "ccgqa4"]
    costs = {}
    for name in args.kinds:
        config = bench.model_config(name, args)
        model = nnx.jit(lambda c=config: DecoderLM(c, rngs=nnx.Rngs(0)))()
        costs[name] = bench.static_costs(model, args.train_len)
    (p0, c0, f0), (p1, c1, f1) = costs["mha"], costs["ccgqa4"]
    # C = 4 and K = N / 2: cache 1 / 8 of MHA's, score FLOPs 1 / 4 (same query heads)
    assert c0 == 8 * c1 and f0 == 4 * f1 and p1 < p0, costs
