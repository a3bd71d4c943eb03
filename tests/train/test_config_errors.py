"""Config files, ``--set`` overrides and their error messages; the data loaders' determinism,
resumability and per-host sharding."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
from train_testlib import REPO, cli_env

from train.config import ConfigError, TrainConfig, apply_overrides, load_config
from train.data import (
    ByteTokenizer,
    RecallLoader,
    WindowLoader,
    builtin_corpus,
    load_tokens,
    make_loaders,
)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], "unknown config key 'stepz'; did you mean ['steps'"),
        (["steps"], "must look like key=value"),
        (["steps=ten"], "--set steps='ten'"),
        (["async_checkpoint=maybe"], "expected true/false"),
        (["compute_dtype=float16"], "compute_dtype='float16' is not one of"),
        (["remat=some"], "remat='some' is not one of"),
        (["batch_size=10", "grad_accum=4"], "batch_size=10 must be a multiple of grad_accum=4"),
        (["steps=0"], "steps=0 must be positive"),
        (["warmup_steps=500"], "warmup_steps=500 must be in [0, steps=120)"),
        (["mesh_data=-1", "mesh_fsdp=-1"], "at most one of mesh_data"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), overrides)
    assert message in str(err.value)


def test_overrides_parse_by_field_type():
    c = apply_overrides(
        TrainConfig(),
        ["steps=7", "lr=0.5", "tensorboard=false", "warmup_steps=1",
         "optimizer=frozen:^(embed|layers/0)/,galore(rank=4,scale=1.0):a{1,2},adamw:.*"],
    )  # fmt: skip
    rules = ("frozen:^(embed|layers/0)/", "galore(rank=4,scale=1.0):a{1,2}", "adamw:.*")
    assert (c.steps, c.lr, c.tensorboard, c.optimizer) == (7, 0.5, False, rules)


def test_mesh_shape_fills_and_checks():
    assert TrainConfig(mesh_fsdp=2).mesh_shape(8) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ConfigError, match="needs 4 devices but 8"):
        TrainConfig(mesh_data=2, mesh_fsdp=2).mesh_shape(8)


def test_config_files_load_and_document_their_command(tmp_path):
    for path in glob.glob(os.path.join(REPO, "train/configs/*.py")):
        if path.endswith("__init__.py"):
            continue
        config = load_config(path)
        assert isinstance(config, TrainConfig)
        assert "python -m train." in open(path).read().split('"""')[1], path
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="must define CONFIG"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))


def test_cli_reports_config_errors_without_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "train.pretrain", "--set", "lr=fast"],
        env=cli_env(1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "config error: --set lr='fast': could not convert string to float: 'fast'"
    )


def test_tokenizer_and_builtin_corpus_are_deterministic():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo\n")) == "héllo\n"
    text = builtin_corpus()
    assert len(text) > 200_000 and text == builtin_corpus()
    assert np.array_equal(load_tokens("builtin")[:100], tok.encode(text)[:100])


def test_builtin_corpus_does_not_depend_on_what_this_process_imported():
    # torch replaces inspect.getfile; read from this process's modules, the corpus lost that
    # docstring here but not in a plain `python -m train.pretrain`, so batches differed
    torch = pytest.importorskip("torch")
    import hashlib
    import inspect

    assert torch is not None and inspect.getfile.__module__ != "inspect"  # the patch is live
    code = "import hashlib; from train.data import builtin_corpus as c; "
    code += "print(hashlib.sha1(c().encode()).hexdigest())"
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(1), cwd=REPO,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == hashlib.sha1(builtin_corpus().encode()).hexdigest()


def test_window_loader_resumes_and_shards_over_hosts():
    tokens = np.arange(10_000, dtype=np.int32)
    full = WindowLoader(tokens, seq_len=16, global_batch=8, seed=3)
    again = WindowLoader(tokens, seq_len=16, global_batch=8, seed=3)
    for step in (0, 5, 200):  # 200 is past the first epoch (624 windows / 8 per step)
        b = full.batch(step)
        assert np.array_equal(b["targets_BT"][:, :-1], b["inputs_BT"][:, 1:])
        assert np.array_equal(again.batch(step)["inputs_BT"], b["inputs_BT"])  # resumable
        hosts = [
            WindowLoader(
                tokens, seq_len=16, global_batch=8, seed=3, process_index=i, process_count=2
            ).batch(step)
            for i in range(2)
        ]
        assert np.array_equal(np.concatenate([h["inputs_BT"] for h in hosts]), b["inputs_BT"])
    assert not np.array_equal(full.batch(0)["inputs_BT"], full.batch(1)["inputs_BT"])


def test_recall_rows_ask_for_earlier_values():
    batch = RecallLoader(seq_len=32, global_batch=4, seed=0).batch(7)
    n = 8  # pairs in a 32-token row
    for inputs, targets, weights in zip(
        batch["inputs_BT"], batch["targets_BT"], batch["weights_BT"], strict=True
    ):
        pairs = dict(zip(inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2], strict=True))
        for t in np.nonzero(weights)[0]:
            assert pairs[inputs[t]] == targets[t]
    assert batch["weights_BT"].sum() > 0


def test_token_ids_beyond_the_vocabulary_are_rejected(tmp_path):
    from train.setup import _check_vocab

    path = tmp_path / "tokens.npy"
    np.save(path, np.array([1, 2, 300, 4] * 100, np.int32))
    config = TrainConfig(data=str(path), seq_len=8, batch_size=2, eval_fraction=0.5)
    loaders = make_loaders(config)

    class Vocab:
        vocab_size = 256

    with pytest.raises(ConfigError, match="holds token id 300 but the model's vocab_size is 256"):
        _check_vocab(config, Vocab, *loaders)
