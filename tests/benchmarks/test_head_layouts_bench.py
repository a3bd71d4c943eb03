"""benchmarks/head_layouts.py on CPU: one tiny run prints the table with a row per kind, the
analytic cache and score-FLOP ratios of CCGQA (its numbers are a smoke test, not a measurement)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import head_layouts as bench  # noqa: E402


def test_tiny_run_prints_the_table(capsys):
    # the smallest shape with C = 4 (latent of 8) and K = N / 2; the ratios do not depend on it
    argv = "--kinds ccgqa4 --d-model 32 --layers 1 --heads 4 --mlp 32 --train-len 16 --steps 1"
    argv += " --rounds 1 --decode-context 8 --decode-steps 1 --pretrain-steps 0"
    rows = bench.main(argv.split())
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| kind | params | cache B/tok | score FLOPs/tok")
    assert [r.split(" | ")[0] for r in table[1:]] == ["| mha", "| ccgqa4"]
    # C = 4 and K = N / 2: cache 1 / 8 of MHA's, score FLOPs 1 / 4 (same query heads)
    assert rows["mha"]["cache"] == 8 * rows["ccgqa4"]["cache"]
    assert rows["mha"]["flops"] == 4 * rows["ccgqa4"]["flops"]
    assert "| 0.25x |" in table[2]
