"""benchmarks/kv_quant.py on CPU: tiny sizes of its three tables (bytes per token with the
formula check, decode tokens/s, recall accuracy per cache); a smoke test, not a measurement."""

import pathlib
import sys

from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import kv_quant as bench  # noqa: E402


def test_tables_at_tiny_sizes():
    rows = bench.bytes_table([8192], budget_gib=1.0)
    kivi2 = [r for r in rows if "| 7B MHA" in r and "| kivi-2 |" in r][0]
    assert kivi2.split(" | ")[3:5] == ["yes", "0.1914"]  # the formula, ~0.19 of bf16 at 32K
    mikv2 = [r for r in rows if "| 7B MHA" in r and "| mikv-2 S=1024 |" in r][0]
    assert mikv2.split(" | ")[3] == "yes"  # MiKV's formula: rows, windows, scores, table
    assert not any("mla-tiny" in r and "mikv" in r for r in rows)  # dense layers only
    rows = bench.decode_table(context=256, steps=1, repeats=1, names=["kivi-2 (fp32 window)"])
    assert rows[0].startswith("| cache @0K") and rows[2].startswith("| fp32 dense |")
    # 2 tensors x K=8 x (32 code + 16 stat bytes) + two 128-token fp32 windows over 256 tokens
    assert rows[3].startswith("| kivi-2 (fp32 window) | 4,864.0 |") and rows[3].endswith("x |")

    from models import DecoderLM, get_config
    from train.config import load_config

    model = DecoderLM(get_config("mla-tiny-default", num_layers=1), rngs=nnx.Rngs(0))
    config = load_config("recall", ["seq_len=32"])
    settings = {"fp32": None, "kivi-2": bench.kivi(2, 8, 8)}
    rows = bench.recall_table(model, config, settings, rows=2)
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| fp32", "| kivi-2"]
