"""Fault injection: a run killed with SIGKILL at random points (after random steps, during
async checkpoint saves) and whose newest checkpoint is corrupted at random between attempts
(bytes flipped or a file truncated), resumed each time, ends bit-identical to an uninterrupted
run; no earlier checkpoint, metric line or config file is lost or changed, and every
corrupted step is skipped in place. Seeded: the same kill/corruption schedule every run
(where a kill lands in time still varies, and every outcome must satisfy the same checks)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import tempfile
import time

import jax
import numpy as np
from train_testlib import Zygote, cli_env, set_args, tiny_config

from jaxattn.sharding import make_mesh
from train.checkpoints import read_meta, restore_params
from train.metrics import latest_rows, read_metrics
from train.pretrain import build_model
from train.step import make_trainer

STEPS = 20
RUN = dict(steps=STEPS, log_every=1, ckpt_every=2, keep_checkpoints=100, eval_every=1000,
           steps_per_call=1)  # fmt: skip
KILLS = 10
TMP = "orbax-checkpoint-tmp"


def _steps_on_disk(ckpt_dir) -> dict[str, dict[str, str]]:
    """Finished step directories (``8``, ``8.corrupt-0``): name -> {file: sha256}."""
    out = {}
    for name in os.listdir(ckpt_dir) if ckpt_dir.is_dir() else ():
        if name.split(".corrupt-")[0].isdigit() and TMP not in name:
            root = ckpt_dir / name
            out[name] = {
                str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(root.rglob("*"))
                if f.is_file()
            }
    return out


def _check_nothing_lost(before: dict, after: dict, metrics_before: bytes, run_dir) -> None:
    """Every finished step seen before is still there, byte for byte (a bad one possibly
    renamed to ``<step>.corrupt-<k>``); the metrics file only grew."""
    for name, files in before.items():
        step = name.split(".corrupt-")[0]
        same = [n for n, f in after.items() if n.split(".corrupt-")[0] == step and f == files]
        assert same, f"checkpoint {name} was changed or removed; now: {sorted(after)}"
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert metrics.startswith(metrics_before), "metrics.jsonl lost or rewrote lines"


def _raw_item(zygote, item_dir):
    """What orbax alone (no jaxattn check) reads of a checkpoint item, read in a forked child:
    ``[dtype, shape, sha256]`` per leaf, or ``{"error": ...}``."""
    fd, out = tempfile.mkstemp(suffix=".json")  # outside the run directory
    os.close(fd)
    out = pathlib.Path(out)
    code = zygote.wait(zygote.start([str(item_dir), str(out)], f"{out}.log",
                                    "train_testlib:item_digest"))  # fmt: skip
    assert code == 0, open(f"{out}.log").read()[-3000:]
    result = json.loads(out.read_text())
    out.unlink(), os.unlink(f"{out}.log")
    return result


def _material(before, after) -> bool:
    """Whether a corruption changed what a reader of the item gets."""
    return isinstance(before, dict) or isinstance(after, dict) or before != after


def _corrupt(zygote, step_dir, rng) -> str:
    """Flip a run of bytes in, or truncate, a random file of a step that restoring reads: its
    metadata or a data file. Some bytes of the data files are never read (a superseded
    per-process index, trailing padding): a corruption that leaves what orbax itself reads
    unchanged is undone and another one drawn, so every corruption made must be detected."""
    files = sorted(
        f for f in step_dir.rglob("*") if f.parent.name == "d" and f.stat().st_size >= 2000
    )
    files.append(step_dir / "meta" / "metadata")
    for _ in range(50):
        victim = files[int(rng.integers(len(files)))]
        item_dir = step_dir / victim.relative_to(step_dir).parts[0]
        pristine = victim.read_bytes()
        before = None if item_dir.name == "meta" else _raw_item(zygote, item_dir)
        data = np.frombuffer(pristine, np.uint8).copy()
        if rng.random() < 0.5:
            start = int(rng.integers(len(data)))
            data[start : start + int(rng.integers(1, 2000))] ^= 0xFF
        else:
            data = data[: int(rng.integers(len(data)))]
        victim.write_bytes(data.tobytes())
        if before is None or _material(before, _raw_item(zygote, item_dir)):
            return str(victim.relative_to(step_dir))
        victim.write_bytes(pristine)  # nothing a reader gets changed: draw again
    raise AssertionError(f"no material corruption of {step_dir} in 50 draws")


def _kill_when(pid, log, ckpt_dir, kind: str, rng) -> None:
    """SIGKILL ``pid`` at a point of kind ``kind``, once the run trains (a leftover temporary
    directory is gone by then): "save" as soon as an async save's temporary directory
    appears; "saved" 0-50 ms after a new checkpoint step is finished; "step" 0-50 ms after
    its 1st-3rd progress line. Near the end of the run it is killed after its first step, so
    it never finishes."""
    n_lines, delay = int(rng.integers(1, 4)), float(rng.uniform(0, 0.05))
    finished = set(_steps_on_disk(ckpt_dir))
    deadline = time.time() + 120
    while time.time() < deadline:
        text = log.read_text() if log.exists() else ""
        assert "done in" not in text, f"the run finished before its kill:\n{text[-2000:]}"
        if f"->{STEPS}," in text and int(text.split(f"->{STEPS},")[0].split()[-1]) > STEPS - 9:
            kind, n_lines, delay = "step", 1, 0.0
        if f"/{STEPS}  loss" in text:  # training
            names = os.listdir(ckpt_dir)
            if kind == "save" and any(TMP in n for n in names):
                break
            if kind == "saved" and {n for n in names if n.isdigit()} - finished:
                time.sleep(delay)
                break
            if kind == "step" and text.count(f"/{STEPS}  loss") >= n_lines:
                time.sleep(delay)
                break
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)


def _final(run_dir):
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    config = tiny_config(run_dir, steps=STEPS)
    _, model_fn = build_model(config)
    trainer = make_trainer(model_fn, config, make_mesh({"data": 1}, jax.devices()[:1]))
    params, meta = restore_params(ckpt_dir, trainer.abstract_state["params"], step=STEPS)
    return jax.tree.map(np.asarray, params), meta


# 11 runs forked from one pre-imported process: 49 s on 2 busy cores
def test_killed_and_corrupted_runs_resume_bit_identical(tmp_path):
    # the schedule: kinds of kill points in a seeded order; after every "saved" kill (and at
    # random after the others) the newest finished step is corrupted
    kinds = np.random.default_rng(12).permutation(["save"] * 3 + ["saved"] * 3 + ["step"] * 4)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    args = set_args(RUN | {"run_dir": str(run_dir)})
    with Zygote(cli_env(1)) as zygote:
        ref = None
        before, metrics_before, config_json = {}, b"", None
        in_save, corrupted, skipped_seen = 0, [], []
        for attempt in range(KILLS + 1):
            rng = np.random.default_rng((12, attempt))
            log = tmp_path / f"attempt{attempt}.log"
            pid = zygote.start(args, log)
            if attempt < KILLS:
                _kill_when(pid, log, ckpt_dir, kinds[attempt], rng)
                assert zygote.wait(pid) == -signal.SIGKILL, log.read_text()[-3000:]
                in_save += any(TMP in n for n in os.listdir(ckpt_dir))
                if ref is None:  # the uninterrupted run, beside the others, compiled by now
                    ref = zygote.start(
                        set_args(RUN | {"run_dir": str(ref_dir)}), tmp_path / "ref.log"
                    )
            else:
                assert zygote.wait(pid) == 0, log.read_text()[-3000:]
            text = log.read_text()
            if corrupted and corrupted[-1][1] == attempt - 1:  # the step corrupted just before
                step = corrupted[-1][0]
                assert f"checkpoint step {step} in {ckpt_dir} is unusable" in text, (
                    f"corrupted {corrupted[-1]} was not detected:\n{text[-3000:]}"
                )
                skipped_seen.append(step)
            after = _steps_on_disk(ckpt_dir)
            _check_nothing_lost(before, after, metrics_before, run_dir)
            config_json = config_json or (run_dir / "config.json").read_bytes()
            assert (run_dir / "config.json").read_bytes() == config_json
            good = [int(n) for n in after if n.isdigit()]
            corrupt = attempt < KILLS and (kinds[attempt] == "saved" or rng.random() < 0.3)
            if corrupt and good:
                victim = _corrupt(zygote, ckpt_dir / str(max(good)), rng)
                corrupted.append((max(good), attempt, victim))
            before = _steps_on_disk(ckpt_dir)
            metrics_before = (run_dir / "metrics.jsonl").read_bytes()
        assert zygote.wait(ref) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert in_save >= 1, "no kill landed during an async save"
    assert len(corrupted) >= 3 and len(skipped_seen) == len(corrupted), corrupted
    # bit for bit: parameters and the stored checksums of every leaf (optimizer state too)
    (ref_params, ref_meta), (params, meta) = _final(ref_dir), _final(run_dir)
    for x, y in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
        assert np.array_equal(x, y)
    assert meta["leaf_checksums"] == ref_meta["leaf_checksums"]
    assert read_meta(str(ckpt_dir), STEPS)["data_step"] == STEPS
    # the per-step metrics a reader sees equal the uninterrupted run's
    rows = {d: latest_rows(read_metrics(d / "metrics.jsonl"), "train") for d in (ref_dir, run_dir)}
    strip = lambda r: json.dumps({k: r[k] for k in ("step", "loss", "grad_norm", "lr")})
    assert [strip(r) for r in rows[run_dir]] == [strip(r) for r in rows[ref_dir]]
    assert [r["step"] for r in rows[run_dir]] == list(range(1, STEPS + 1))
