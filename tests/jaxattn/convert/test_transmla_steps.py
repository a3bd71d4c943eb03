"""jaxattn.convert's TransMLA steps on one layer: the identities each step rests on.

Exact step: the MLA layer (rope key = the K keys in blocks, latent = the values) equals the GQA
layer with q/k/v biases. RoRoPE (freqfold 1): the discarded share of rope energy equals the
calibration energy of the de-rotated dims. PCA: the discarded eigenvalue share equals the
latent's reconstruction error on the calibration tokens, full rank is exact and the error does
not grow with the rank. The fitted latent norm's scale is the least-squares optimum.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import convert as C
from jaxattn.convert._params import augmented
from jaxattn.layers import AttentionConfig, MLAConfig
from jaxattn.ops.rope import NTKScaling, RopeConfig

D, N, K, H = 32, 4, 2, 8
X = np.random.default_rng(1).normal(size=(4, 12, D)).astype(np.float32)
TOL = 1e-4


@nnx.jit
def _run(layer, x):  # one compile per layer structure (eager calls compile every op)
    return layer(x)


def _build(cfg, params=None, seed=0):
    """The layer of ``cfg`` (abstract init: no eager per-shape compiles) holding ``params``, or
    numpy-drawn weights when None."""
    layer = nnx.eval_shape(lambda: cfg.build(rngs=nnx.Rngs(seed)))
    if params is None:
        rng = np.random.default_rng(seed)
        params = {}
        for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
            value = rng.normal(0, 1 / np.sqrt(D), var.shape).astype(np.float32)
            params.setdefault("/".join(map(str, path[:-1])), {})[str(path[-1])] = value
    C.load_layer_params(layer, params)
    return layer


@pytest.fixture(scope="module")
def gqa():
    cfg = AttentionConfig(
        d_model=D, num_heads=N, num_kv_heads=K, head_dim=H, qkv_bias=True, rope=RopeConfig()
    )
    layer = _build(cfg)
    params = C.layer_params(layer)
    rng = np.random.default_rng(0)
    for name in ("q", "k", "v"):  # biases start at zero: make them count
        params[name]["bias"] = rng.normal(0, 0.5, params[name]["bias"].shape)
    C.load_layer_params(layer, params)
    return cfg, params, np.asarray(_run(layer, X))


@pytest.fixture(scope="module")
def exact(gqa):
    cfg, params, _ = gqa
    return C.gqa_to_mla(cfg, params)[:2]


@pytest.fixture(scope="module")
def moments():
    return C.input_moments(X)


def test_exact_step_equals_gqa_with_biases(gqa, exact):
    _, _, ref = gqa
    cfg, params = exact
    assert (cfg.qk_rope_head_dim, cfg.rope_block_dim, cfg.kv_lora_rank) == (K * H, H, K * H)
    np.testing.assert_allclose(np.asarray(_run(_build(cfg, params), X)), ref, atol=TOL)


def test_rope_step_discards_exactly_the_reported_energy(exact, moments):
    cfg, params = exact
    new, new_params, info = C.decouple_rope(cfg, params, moments)  # freqfold 1, rope_dim H
    pd = K * H - H
    assert (new.qk_rope_head_dim, new.kv_lora_rank, new.qk_nope_head_dim) == (H, pd + K * H, H)
    x1 = np.concatenate([np.asarray(X).reshape(-1, D), np.ones((X.shape[0] * X.shape[1], 1))], 1)
    k_old = x1 @ augmented(params["kv_a"], (cfg.kv_lora_rank + K * H,))[:, cfg.kv_lora_rank :]
    k_drop = x1 @ augmented(new_params["kv_a"], (new.kv_lora_rank + H,))[:, :pd]
    measured = (k_drop**2).sum() / (k_old**2).sum()
    assert info["discarded_rope_energy"] == pytest.approx(measured, rel=1e-6)
    assert 0 < measured < 1
    assert info["q_factor_residual"] < 1e-12  # the dropped query dims of a GQA head: rank H


def test_rope_step_options_are_checked(exact, moments):
    cfg, params = exact
    for kw, match in [
        (dict(rope_dim=3), "rope_dim=3"),
        (dict(rope_dim=4, freqfold=1), "freqfold=1 must be a multiple of collapse=2"),
        (dict(freqfold=3), "freqfold=3"),
    ]:
        with pytest.raises(ValueError, match=match):
            C.decouple_rope(cfg, params, moments, **kw)
    # NTK's theta grows with the rotated width: every 2nd frequency of 8 dims != rope over 4
    ntk = RopeConfig(scaling=NTKScaling(factor=4.0))
    with pytest.raises(ValueError, match="NTKScaling.*use rope_dim=8"):
        C.decouple_rope(dataclasses.replace(cfg, rope=ntk), params, moments, rope_dim=4, freqfold=2)
    C.decouple_rope(cfg, params, moments, rope_dim=4, freqfold=2)  # plain rope collapses


@pytest.fixture(scope="module")
def roped(exact, moments):
    cfg, params = exact
    return C.decouple_rope(cfg, params, moments)[:2]


def _latent(cfg, params, x):
    x1 = np.concatenate([np.asarray(x).reshape(-1, D), np.ones((x.shape[0] * x.shape[1], 1))], 1)
    return (
        x1
        @ augmented(params["kv_a"], (cfg.kv_lora_rank + cfg.qk_rope_head_dim,))[
            :, : cfg.kv_lora_rank
        ]
    )


def test_pca_discards_the_reported_spectrum_and_full_rank_is_exact(roped, moments):
    cfg, params = roped
    ref = np.asarray(_run(_build(cfg, params), X))
    c = _latent(cfg, params, X)
    errors = []
    for r in (4, 12, 20):
        new, p, info = C.compress_latent(cfg, params, moments, kv_lora_rank=r, balance_kv=False)
        z = _latent(new, p, X)  # = c R: the reconstruction is z Rᵀ, and ‖c - z Rᵀ‖² = ‖c‖² - ‖z‖²
        measured = 1 - (z**2).sum() / (c**2).sum()
        assert info["discarded_latent_energy"] == pytest.approx(measured, rel=1e-5, abs=1e-9)
        errors.append(measured)
    assert errors == sorted(errors, reverse=True)
    for balance in (False, True):  # full rank: a rotation (and an exact key rescaling)
        new, p, info = C.compress_latent(
            cfg, params, moments, kv_lora_rank=cfg.kv_lora_rank, balance_kv=balance
        )
        np.testing.assert_allclose(np.asarray(_run(_build(new, p), X)), ref, atol=TOL)
        assert info["discarded_latent_energy"] == pytest.approx(0.0, abs=1e-9)
    assert info["kv_ratio"] != 1.0


def test_pca_bad_input_is_named(roped, moments):
    cfg, params = roped
    with pytest.raises(
        ValueError, match=rf"kv_lora_rank=0 must be an int in \[1, {cfg.kv_lora_rank}\]"
    ):
        C.compress_latent(cfg, params, moments, kv_lora_rank=0)
    few = C.input_moments(X[:1, :3])
    with pytest.raises(ValueError, match="3 tokens, fewer than kv_lora_rank=8"):
        C.compress_latent(cfg, params, few, kv_lora_rank=8)
    normed = dataclasses.replace(cfg, kv_norm=True)
    with pytest.raises(ValueError, match="kv_norm=False"):
        C.compress_latent(normed, params, moments, kv_lora_rank=8)


def test_latent_norm_scale_is_the_least_squares_fit(roped):
    cfg, params = roped
    c = jnp.asarray(_latent(cfg, params, X))
    stats = C.latent_norm_stats(c[None], cfg.latent_norm_eps)
    new, p, info = C.fit_latent_norm(cfg, params, stats)
    assert new.kv_norm
    g = p["kv_norm"]["scale"]
    normed = np.asarray(c * jax.lax.rsqrt(jnp.mean(c * c, -1, keepdims=True) + cfg.latent_norm_eps))

    def err(scale):
        return ((np.asarray(c) - scale * normed) ** 2).sum() / (np.asarray(c) ** 2).sum()

    assert info["latent_norm_residual"] == pytest.approx(err(g), rel=1e-4)
    for bump in (0.99, 1.01):
        assert err(g * bump) > err(g)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rope_block_dim=6), "rope_block_dim=6 must be even and divide"),
        (dict(kv_norm=1), "kv_norm must be a bool"),
        (dict(rope=RopeConfig(rotary_dim=16)), "rotary_dim=16 must equal rope_block_dim=8"),
        (dict(qk_nope_head_dim=-1), "qk_nope_head_dim"),
    ],
)
def test_mla_config_validates_the_conversion_fields(kw, match):
    base = dict(d_model=D, num_heads=N, kv_lora_rank=8, qk_nope_head_dim=0, qk_rope_head_dim=16)
    base |= dict(v_head_dim=8, rope_block_dim=8, rope=RopeConfig())
    with pytest.raises(ValueError, match=match):
        MLAConfig(**(base | kw))


def test_gqa_to_mla_refuses_what_it_cannot_hold():
    cfg = AttentionConfig(
        d_model=D, num_heads=N, num_kv_heads=K, qk_norm=True, sliding_window=4, rope=RopeConfig()
    )
    with pytest.raises(ValueError, match="qk_norm=True.*sliding_window=4"):
        C.gqa_to_mla(cfg, {})
