"""save / load: adapter.safetensors + adapter_config.json round trip and mismatch errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as L
from models import DecoderLM, get_config

TOK = np.random.default_rng(1).integers(0, 256, (2, 8)).astype(np.int32)  # numpy: no compile

# models are built, adapted and called in compiled programs (eagerly, every op compiles); a
# jitted build has the eager build's parameters
_BUILDERS = {}
_fwd = nnx.jit(lambda m, t: m(t))


def _lm(**kw):
    key = tuple(sorted(kw.items()))
    if key not in _BUILDERS:
        cfg = get_config("llama-tiny", **kw)
        _BUILDERS[key] = nnx.jit(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    return _BUILDERS[key]()


def _adapted(tmp_path):
    m = _lm()
    cfg = L.AdapterConfig(
        options=dict(rank=2, use_dora=True), targets=r"attn/(q|o)$", rank_pattern={"attn/o": 3}
    )
    paths = []

    @nnx.jit
    def adapt(m):  # the paths are recorded while tracing
        paths.extend(L.apply(m, cfg, rngs=nnx.Rngs(1)))
        for p in paths:
            ad = L.linear_paths(m)[p].adapter.adapters["default"]
            b = 0.05 * np.random.default_rng(len(p)).standard_normal(ad.b.shape, np.float32)
            ad.b[...] = jnp.asarray(b)
            ad.magnitude[...] = ad.magnitude[...] * 1.1

    adapt(m)
    L.save(m, str(tmp_path))
    return m, paths


def test_round_trip_gives_same_logits(tmp_path):
    """A fresh base + load == the saved adapted model (DoRA, per-path ranks kept)."""
    m, paths = _adapted(tmp_path)
    meta = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert meta["methods"]["layers/0/attn/o"]["rank"] == 3
    assert meta["base_shapes"]["layers/0/attn/q"] == [[64], [4, 16]]
    fresh = _lm()
    assert L.load(fresh, str(tmp_path)) == paths
    np.testing.assert_allclose(np.asarray(_fwd(fresh, TOK)), np.asarray(_fwd(m, TOK)), atol=1e-6)
    assert fresh.layers[0].attn.o.adapter.record("default")[1].rank == 3


def test_mismatched_base_lists_every_mismatch(tmp_path):
    """Loading into a model of other shapes names each mismatched projection."""
    _adapted(tmp_path)
    other = _lm(d_model=32)
    with pytest.raises(ValueError) as err:
        L.load(other, str(tmp_path))
    msg = str(err.value)
    for p in ("layers/0/attn/q", "layers/0/attn/o", "layers/1/attn/q", "layers/1/attn/o"):
        assert f"{p}: saved" in msg
    assert "layers/0/attn/q: saved [64]->[4, 16], model [32]->[4, 8]" in msg


def test_save_errors(tmp_path):
    """Saving a name no projection holds, or a merged adapter, raises."""
    m, _ = _adapted(tmp_path)
    with pytest.raises(ValueError, match="no projection holds an adapter named 'other'"):
        L.save(m, str(tmp_path / "x"), "other")
    nnx.jit(lambda m: (L.merge(m), None)[1])(m)  # in one compiled program
    with pytest.raises(ValueError, match="unmerge first"):
        L.save(m, str(tmp_path / "x"))


def test_load_under_another_name_next_to_the_first(tmp_path):
    """load(name=...) adds the saved adapter beside an existing one; loading twice under one
    name raises."""
    m, _ = _adapted(tmp_path)
    L.load(m, str(tmp_path), name="copy")
    q = m.layers[0].attn.q.adapter
    assert sorted(q.adapters) == ["copy", "default"]
    np.testing.assert_array_equal(q.adapters["copy"].b[...], q.adapters["default"].b[...])
    with pytest.raises(ValueError, match="already has an adapter named 'copy'"):
        L.load(m, str(tmp_path), name="copy")
