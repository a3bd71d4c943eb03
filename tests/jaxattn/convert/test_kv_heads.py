"""KV-head compression (PAPERS.md §2, "Effectively Compress KV Heads"): MHA -> GQA on one layer.

Faithful tests: group size 1 reproduces the layer exactly; the reported key / value errors are
the discarded spectrum, equal to the reconstruction error on the calibration tokens and never
above mean-pooling's; heads that really are one head in RoPE-compatible form (per frequency
pair a common scale; values a common linear map) merge exactly at every position, RoPE applied
after merging.
"""

import numpy as np
import pytest
from flax import nnx

from jaxattn import convert as C
from jaxattn.convert._params import augmented
from jaxattn.layers import AttentionConfig, Context
from jaxattn.ops.rope import RopeConfig

D, N, H = 32, 4, 8
X = np.random.default_rng(2).normal(size=(2, 40, D)).astype(np.float32)
TOL = 1e-4


@nnx.jit
def _run(layer, x, ctx=None):  # one compile per layer structure (eager calls compile every op)
    return layer(x, ctx)


def _layer(cfg, params=None):
    """The layer of ``cfg`` (abstract init: no eager per-shape compiles) holding ``params``, or
    numpy-drawn weights when None."""
    layer = nnx.eval_shape(lambda: cfg.build(rngs=nnx.Rngs(0)))
    if params is None:
        rng = np.random.default_rng(0)
        params = {}
        for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
            value = rng.normal(0, 1 / np.sqrt(D), var.shape).astype(np.float32)
            params.setdefault("/".join(map(str, path[:-1])), {})[str(path[-1])] = value
    C.load_layer_params(layer, params)
    return layer


@pytest.fixture(scope="module")
def mha():
    # partial rotary (6 of 8 dims): the pass-through dims take the no-RoPE path
    cfg = AttentionConfig(d_model=D, num_heads=N, qkv_bias=True, rope=RopeConfig(rotary_dim=6))
    layer = _layer(cfg)
    params = C.layer_params(layer)
    rng = np.random.default_rng(0)
    for name in ("q", "k", "v"):
        params[name]["bias"] = rng.normal(0, 0.3, params[name]["bias"].shape)
    C.load_layer_params(layer, params)
    return cfg, params, np.asarray(_run(layer, X)), C.input_moments(X)


def test_group_size_one_is_exact(mha):
    cfg, params, ref, moments = mha
    new, p, info = C.merge_kv_heads(cfg, params, moments, num_kv_heads=N)
    np.testing.assert_allclose(np.asarray(_run(_layer(new, p), X)), ref, atol=TOL)
    assert info["key_error"] == pytest.approx(0, abs=1e-12)
    assert info["value_error"] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("groups", [2, 1])
def test_errors_are_the_discarded_spectrum_and_beat_mean_pooling(mha, groups):
    cfg, params, _, moments = mha
    new, p, info = C.merge_kv_heads(cfg, params, moments, num_kv_heads=groups)
    assert new.n_kv == groups
    x1 = np.concatenate([np.asarray(X).reshape(-1, D), np.ones((X.size // D, 1))], axis=1)
    for name, key in (("k", "key_error"), ("v", "value_error")):
        before = x1 @ augmented(params[name], (N, H)).reshape(D + 1, -1)
        after = x1 @ augmented(p[name], (groups, H)).reshape(D + 1, -1)
        # orthonormal merges: ‖group - reconstruction‖² = ‖group‖² - ‖merged‖²
        measured = 1 - (after**2).sum() / (before**2).sum()
        assert info[key] == pytest.approx(measured, rel=1e-5)
        assert 0 < info[key] <= info[key + "_meanpool"]


def test_rope_compatible_low_rank_heads_merge_exactly_at_every_position():
    cfg = AttentionConfig(d_model=D, num_heads=2, head_dim=H, rope=RopeConfig())
    layer = _layer(cfg)
    params = C.layer_params(layer)
    rng = np.random.default_rng(1)
    s = rng.uniform(0.5, 2.0, H // 2)  # head 1's key = head 0's, pair j scaled by s_j
    params["k"]["kernel"][:, 1] = params["k"]["kernel"][:, 0] * np.concatenate([s, s])
    params["v"]["kernel"][:, 1] = params["v"]["kernel"][:, 0] @ rng.normal(size=(H, H))
    C.load_layer_params(layer, params)
    new, p, info = C.merge_kv_heads(cfg, params, C.input_moments(X), num_kv_heads=1)
    assert info["key_error"] < 1e-10 and info["value_error"] < 1e-10
    assert info["key_error_meanpool"] > 1e-3  # unequal heads: mean pooling is not exact
    far = Context.create(2, 40, positions_BT=np.arange(1000, 1040)[None].repeat(2, 0))
    for ctx in (None, far):
        np.testing.assert_allclose(
            np.asarray(_run(_layer(new, p), X, ctx)), np.asarray(_run(layer, X, ctx)), atol=TOL
        )


def test_bad_input_is_named(mha):
    cfg, params, _, moments = mha
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide the layer's 4 kv heads"):
        C.merge_kv_heads(cfg, params, moments, num_kv_heads=3)
    normed = AttentionConfig(d_model=D, num_heads=N, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        C.merge_kv_heads(normed, params, moments, num_kv_heads=2)
