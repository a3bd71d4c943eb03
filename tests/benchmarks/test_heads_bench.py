"""benchmarks/heads.py on CPU, a smoke test: every variant has a finite time and the forward
with no hook active traces to the same jaxpr as the plain forward."""

import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import heads as bench  # noqa: E402


def test_every_variant_runs_and_no_hooks_is_the_same_program():
    rows, same = bench.rows_of(batch_size=8, repeats=1, min_run_s=0.0, rounds=1)
    assert same
    names = [n for n, _ in rows]
    assert names[:2] == ["forward", "forward, hooks=()"] and len(names) == 8
    assert all(np.isfinite(s) and s > 0 for _, s in rows)
