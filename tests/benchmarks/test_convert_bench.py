"""benchmarks/convert.py on CPU, a smoke test: on an untrained 1-layer Llama, the exact TransMLA
row keeps the cache bytes and the perplexity (the reduction is exact) and the decode table has
a row per model (the other methods' rows are the same code with other options; they cost more
compile time than this test's budget)."""

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import convert as bench  # noqa: E402
from models import DecoderLM, get_config  # noqa: E402


def _model(cfg):
    """An untrained model: abstract init, weights drawn with numpy (no eager init compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    values = []
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "scale":
            value = np.ones(var.shape)
        else:
            value = rng.normal(0, 1 / np.sqrt(cfg.d_model), var.shape)
        values.append((path, var.replace(jnp.asarray(np.asarray(value, var.dtype)))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def _rows(lines):
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines if x.startswith("| ")]
    return {r[0]: r for r in cells[1:]}


def test_tables_run_and_the_exact_row_is_exact(tmp_path):
    model = _model(get_config("llama-tiny").replace(num_layers=1))
    calib, held = bench.splits(model, calib_rows=8, eval_rows=2, seq_len=32)
    lines, converted, points = bench.conversions(model, calib, held, ["exact"], seq_len=32)
    rows = _rows(lines)
    before, after = rows["transmla exact"][3].split(" → ")
    assert before == after  # 3 decimals: the exact step changes logits by fp32 rounding only
    assert rows["transmla exact"][2] == "256 → 256"
    assert points == [("transmla exact", 1.0, points[0][2])] and abs(points[0][2]) < 1e-3
    bench.plot(points, str(tmp_path / "convert.png"))
    assert (tmp_path / "convert.png").stat().st_size > 0
    speed = bench.decode_speed({"exact": converted["exact"]}, batch=1, new_tokens=2, repeats=1)
    assert list(_rows(speed)) == ["exact"]
