"""benchmarks/sparse.py on CPU: one tiny run prints both tables with a row per length (its
numbers are a smoke test, not a measurement)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import sparse as bench  # noqa: E402


def test_tiny_run_prints_both_tables(capsys):
    argv = (
        "--lengths 128 --heads 2 --kv-heads 1 --head-dim 8 --cmp-block 8 --cmp-stride 4 "
        "--sel-block 16 --top-n 4 --window 32 --block 32 --density 0.25 --repeats 1"
    )
    bench.main(argv.split())
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| T | NSA fwd s | full fwd s")
    assert rows[1].startswith("| 128 |") and rows[1].count("x |") == 2
    assert rows[2].startswith("| T | visits s | dense-mask s")
    assert rows[3].startswith("| 128 |") and "x |" in rows[3]
