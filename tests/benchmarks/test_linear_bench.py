"""benchmarks/linear.py on CPU: one tiny run prints both tables with a row per length and per
context (its numbers are a smoke test, not a measurement)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import linear as bench  # noqa: E402


def test_tiny_run_prints_both_tables(capsys):
    argv = "--lengths 32 --contexts 16 32 --heads 2 --kv-heads 1 --head-dim 8 --chunk 16"
    bench.main([*argv.split(), "--repeats", "1", "--decode-steps", "4", "--variants", "simple_gla"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| T | simple_gla s | softmax s")
    assert rows[1].startswith("| 32 |") and rows[1].endswith("x |")
    assert rows[2].startswith("| context | simple_gla state tok/s")
    assert [r.split(" | ")[0] for r in rows[3:]] == ["| 16", "| 32"]
