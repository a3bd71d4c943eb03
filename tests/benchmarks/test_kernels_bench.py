"""benchmarks/kernels.py on CPU: the FLOP counter, the peers' call plumbing and failure
handling, and one --interpret run of the whole script (its numbers are meaningless: the Mosaic
GPU kernels run in the interpreter; the GPU-only peers must be left out with a printed note).
"""

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
from benchmarks import kernels  # noqa: E402


@pytest.mark.parametrize("T", [1, 2, 7, 128, 1000, 16384])
def test_causal_visible_fraction_square(T):
    pairs = kernels.visible_pairs(T, T, causal=True)
    assert pairs == T * (T + 1) // 2
    assert pairs / (T * T) == pytest.approx((T + 1) / (2 * T), rel=1e-12)
    assert kernels.visible_pairs(T, T, causal=False) == T * T


@pytest.mark.parametrize(
    "T, S, q_offset, kv_length",
    [(5, 9, 4, 7), (6, 6, -2, None), (3, 10, 20, 4), (4, 8, 0, 0), (7, 3, 1, 99)],
)
def test_visible_pairs_match_a_materialised_mask(T, S, q_offset, kv_length):
    q_pos = np.arange(T)[:, None] + q_offset
    k_pos = np.arange(S)[None, :]
    live = k_pos < (S if kv_length is None else kv_length)
    for causal in (True, False):
        want = int(
            ((k_pos <= q_pos) & live).sum() if causal else np.broadcast_to(live, (T, S)).sum()
        )
        got = kernels.visible_pairs(T, S, causal=causal, q_offset=q_offset, kv_length=kv_length)
        assert got == want, (causal, got, want)


def test_flash_flops_conventions():
    B, N, T, H = 2, 3, 8, 64
    full = kernels.flash_flops(B=B, N=N, T=T, S=T, H=H, V=H, causal=False)
    assert full == 4 * B * N * T * T * H  # two matmuls of 2·T·S·H each
    causal = kernels.flash_flops(B=B, N=N, T=T, S=T, H=H, V=H, causal=True)
    assert causal == full * (T + 1) / (2 * T)
    ragged = kernels.flash_flops(B=B, N=N, T=T, S=T, H=H, V=32, causal=False, kv_lengths=[8, 2])
    assert ragged == 2 * N * (H + 32) * T * (8 + 2)
    assert kernels.BWD_FACTOR == 2.5


def _cfg():
    return argparse.Namespace(
        tokens=128, hidden=128, repeats=1, min_run_s=0.0, interpret=False,
        decode_configs=kernels.TINY_DECODE,
    )  # fmt: skip


def _broken(*_, **__):
    raise NotImplementedError("no such shape")


def test_peer_plumbing_and_a_failing_peer():
    """The jax.nn-style peers' calls (here with implementation='xla', which runs on CPU) give
    numbers; a peer that raises gets 'n/a (reason)' and the row goes on."""
    impls = {
        "ours": kernels._sdpa(jax.nn.dot_product_attention, "xla"),
        "cudnn": (lambda causal: _broken, _broken),
    }
    tk, _ = kernels._tokamax()
    if tk is not None:
        impls["tokamax"] = kernels._sdpa(tk.dot_product_attention, "xla")
    row = kernels.flash_row(impls, 64, 128, "causal", _cfg())
    for name in impls.keys() - {"cudnn"}:
        assert row[name]["fwd_tflops"] > 0 and row[name]["fwd_bwd_ms"] > 0, row[name]
    assert row["cudnn"] == {"error": "NotImplementedError: no such shape"}
    lines = kernels.flash_table([row], ["cudnn", "tokamax"], peak=None)
    assert len(lines) == 4 and "| n/a (NotImplementedError: no such shape) |" in lines[2]

    drow = kernels.decode_row(impls, "tiny_n4_k2_h64", 2, 256, _cfg())
    for name in impls.keys() - {"cudnn"}:
        assert drow[name]["gbps"] > 0, drow[name]
    assert drow["gbytes"] == 2 * 256 * 2 * (64 + 64) * 2 / 1e9
    assert "n/a (NotImplementedError" in kernels.decode_table([drow], ["cudnn"], hbm=None)[2]


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_interpret_run_prints_tables(capsys, tmp_path):
    json_path, md_path = tmp_path / "k.json", tmp_path / "k.md"
    argv = ["--interpret", "--json", str(json_path), "--markdown", str(md_path)]
    assert kernels.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("Device: ") and f"jax {jax.__version__}" in lines[0]
    assert "- cudnn: n/a (" in out and "- tokamax: n/a (" in out  # left out, and said so
    assert "numbers are meaningless" in out

    header = _cells(next(x for x in lines if x.startswith("| H | T |")))
    rows = [_cells(x) for x in lines if x.startswith("| 64 | 128 |")]
    assert [(r[3], r[4]) for r in rows] == [
        ("causal", "fwd"), ("causal", "bwd"), ("none", "fwd"), ("none", "bwd"),
    ]  # fmt: skip
    col = {name: i for i, name in enumerate(header)}
    noise = "n/a (fwd+bwd time <= fwd time (noise))"  # bwd = (fwd+bwd) - fwd, two medians
    for r in rows:
        if r[4] == "bwd" and r[col["ours TFLOP/s"]] == noise:
            assert r[col["ours ms"]] == "n/a"  # never a negative time
        else:
            assert float(r[col["ours ms"]]) > 0 and float(r[col["ours TFLOP/s"]]) >= 0
        assert r[col["cudnn TFLOP/s"]] == "n/a" and r[col["tokamax TFLOP/s"]] == "n/a"
    (decode,) = [_cells(x) for x in lines if x.startswith("| tiny_n4_k2_h64 |")]
    assert decode[1:3] == ["1", "256"] and float(decode[4]) > 0 and float(decode[5]) >= 0

    result = json.loads(json_path.read_text())
    assert result["platform"] == "cpu" and result["skipped"] == []
    assert [r["mask"] for r in result["flash"]] == ["causal", "none"]
    assert {"fwd_tflops", "bwd_tflops"} <= result["flash"][0]["ours"].keys()
    assert md_path.read_text() == out


def test_grid_order_unsupported_decode_shape_and_targets():
    args = kernels._parser().parse_args([])
    jobs = kernels._jobs(args, *kernels._grids(args)[:2])
    kinds = [j[0] for j in jobs]
    first, last = kinds.index("decode"), len(kinds) - 1 - kinds[::-1].index("decode")
    assert set(kinds[first : last + 1]) == {"decode"}  # a time-budget cut spares H=128, decode
    assert {j[1] for j in jobs[:first]} == {128} and {j[1] for j in jobs[last + 1 :]} == {64, 256}

    cfg = argparse.Namespace(decode_configs=kernels.DECODE_CONFIGS)
    row = kernels.decode_row({"ours": None}, "mla_n16_k1_h576", 8, 32768, cfg)
    assert "head dims" in row["ours"]["error"] and "skipped" in row  # nothing was run

    flash = dict(H=128, T=16384, B=1, N=16, mask="causal")
    flash.update(ours=dict(fwd_tflops=620.0, bwd_tflops=440.0), cudnn=dict(fwd_tflops=500.0))
    decode = dict(ours=dict(gbps=3840.0))
    lines = kernels.targets([flash], [decode], hbm=4800)
    assert "fwd 620 TFLOP/s" in lines[0] and "bwd 440" in lines[0] and "fwd 1.24x" in lines[0]
    assert "ours 80%..80% over 1 points" in lines[1]
