"""benchmarks/lowrank.py on CPU: the four variants' models agree where they should (the
benchmark's inline single LoRA equals a one-adapter bank of the same factors) and one tiny
run prints the table and the target line (its numbers are a smoke test, not a measurement)."""

import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import lowrank as bench  # noqa: E402
from jaxattn import lowrank  # noqa: E402
from models import DecoderLM, get_config  # noqa: E402

# built, adapted and called in compiled programs (eagerly, every op compiles); a jitted init
# has the eager init's parameters
_CFG = get_config("llama-tiny", num_layers=1)
_lm = nnx.jit(lambda: DecoderLM(_CFG, rngs=nnx.Rngs(0)))
_fwd = nnx.jit(lambda m, t, ids: m(t, sequence_ids_B=ids))


def test_inline_single_lora_equals_one_adapter_bank():
    single, bank = _lm(), _lm()
    method = lowrank.make_method("bench_lora", rank=4)
    paths = []

    @nnx.jit
    def attach(m):
        rngs = nnx.Rngs(5)
        paths.extend(lowrank.attach(m, "mlp/", lambda p, lin: method.build(p, lin, rngs=rngs)))

    attach(single)
    assert paths
    ads = {p: lin.adapter for p, lin in lowrank.linear_paths(single).items() if p in paths}
    lowrank.attach(bank, "mlp/", lambda p, lin: lowrank.stack_adapters([ads[p]]))
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    want = _fwd(single, tokens, None)
    np.testing.assert_allclose(_fwd(bank, tokens, None), want, rtol=2e-5, atol=2e-5)
    got = _fwd(bank, tokens, np.zeros((2,), np.int32))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert np.abs(np.asarray(want) - np.asarray(_fwd(_lm(), tokens, None))).max() > 1e-3


def test_tiny_run_prints_table(capsys, tmp_path):
    path = tmp_path / "l.json"
    argv = ["--layers", "1", "--batch", "4", "--adapters", "4", "--seq", "8", "--rank", "2",
            "--repeats", "1", "--rounds", "2", "--min-run-ms", "0",
            "--json", str(path)]  # fmt: skip
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Device: ") and f"jax {jax.__version__}" in lines[0]
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in lines if x.startswith("| ")]
    assert [r[0] for r in rows[1:]] == ["no adapter", "single", "bank n=1", "bank n=4 mixed"]
    assert rows[2][2] == "1.000" and rows[3][3] == "1.000"  # each reference against itself
    assert rows[1][4] == "n/a" and float(rows[4][4]) > 0 and float(rows[4][1]) > 0
    assert lines[-1].startswith("Target (issue 14): 4 adapters fwd <= 1.3x one adapter")
    result = json.loads(path.read_text())
    assert result["platform"] == "cpu" and len(result["rows"]) == 4
