"""The committed trained models (train.trained) match their configs: the stored model config is
the one ``train.pretrain`` builds from the config file, every tensor has the shape that config
gives, the manifest's config hash is the current file's (edit the config -> retrain and
re-export), the file's sha256 is the manifest's, and the recall accuracy reproduces."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from train import trained
from train.pretrain import build_model


@pytest.mark.parametrize("name", sorted(trained.TRAINED))
def test_committed_weights_match_their_config(name):
    config = trained.train_config(name)
    manifest = trained.read_manifest(name)
    assert manifest["train_config_sha256"] == trained.config_hash(config), (
        f"train/configs/{trained.TRAINED[name]} changed since the weights were exported: "
        f"rerun {manifest['command']}"
    )
    model_config, model_fn = build_model(config)
    assert trained.stored_model_config(name) == model_config
    model = trained.load_trained(name)
    want = jax.tree.map(lambda a: a.shape, nnx.state(nnx.eval_shape(model_fn), nnx.Param))
    got = jax.tree.map(lambda a: a.shape, nnx.state(model, nnx.Param))
    assert jax.tree.leaves(want) == jax.tree.leaves(got)
    size = os.path.getsize(os.path.join(trained.weights_dir(name), "model.safetensors"))
    assert size < 4 * 2**20
    batch = trained.eval_batch(name)
    accuracy = trained.recall_accuracy(jax.jit(lambda t: model(t))(batch["inputs_BT"]), batch)
    np.testing.assert_allclose(accuracy, manifest["recall_accuracy"], atol=1e-4)
    assert accuracy >= 0.99


def test_bad_weights_and_names(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown trained model 'nope'"):
        trained.load_trained("nope")
    src = trained.weights_dir("heads-recall")
    dst = tmp_path / "heads_recall"
    dst.mkdir()
    data = bytearray(open(os.path.join(src, "model.safetensors"), "rb").read())
    data[-1] ^= 1
    (dst / "model.safetensors").write_bytes(bytes(data))
    (dst / "manifest.json").write_text(open(os.path.join(src, "manifest.json")).read())
    monkeypatch.setattr(trained, "weights_dir", lambda name: str(dst))
    with pytest.raises(ValueError, match="sha256"):
        trained.load_trained("heads-recall")
    assert json.loads((dst / "manifest.json").read_text())["step"] > 0
