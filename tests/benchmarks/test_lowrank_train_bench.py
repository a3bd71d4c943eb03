"""benchmarks/lowrank_train.py on CPU: the per-method table counts what LoRA's formula says and
the optimizer state of its rules exactly (AdamW: two fp32 moments per trainable element plus
the step counts), and the merged-inference part runs (its times are a smoke test)."""

import argparse
import pathlib
import re
import sys

from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import lowrank_train as bench  # noqa: E402
from jaxattn import lowrank  # noqa: E402
from models import DecoderLM, get_config  # noqa: E402


def _rows(lines):
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines if x.startswith("| ")]
    return {r[0] + (" dora" if "use_dora" in r[1] else ""): r for r in cells[1:]}


# one layer: the counts are per projection (each layer adds the same), and each layer adds
# every method's trace of the train step's init
ARGS = dict(rank=4, layers=1)


def test_method_table_counts_lora_and_adamw_state_exactly():
    rows = _rows(bench.methods(argparse.Namespace(**ARGS)))
    base = nnx.eval_shape(lambda: DecoderLM(get_config("mla-tiny-default", num_layers=1),
                                            rngs=nnx.Rngs(0)))  # fmt: skip
    linears = [lin for p, lin in lowrank.linear_paths(base).items() if re.search(bench.PATTERN, p)]
    want = sum(4 * (lin.fan_in + lin.fan_out) for lin in linears)
    num = lambda s: int(s.replace(",", ""))
    assert num(rows["lora"][2]) == want
    assert want * 8 <= num(rows["lora"][4]) <= want * 8 + 64  # fp32 mu, nu + step counts
    dora = sum(lin.fan_out for lin in linears)  # + one magnitude per output
    assert num(rows["lora dora"][2]) == want + dora
    full = rows["full fine-tuning (AdamW)"]
    assert full[3] == "100" and num(full[2]) > 10 * want
    registered = set(lowrank.registered_methods()) - bench.SKIP
    assert registered <= set(rows), registered - set(rows)


def test_merged_part_runs():
    lines = bench.merged(argparse.Namespace(rank=2, layers=1, batch=1, seq=8, rounds=1))
    assert list(_rows(lines)) == ["base", "LoRA, unmerged", "LoRA, merged"]
