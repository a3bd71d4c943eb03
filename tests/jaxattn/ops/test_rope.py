"""Tests of jaxattn.ops.rope: closed-form rotations, RoPE's invariants, parity with the Hugging
Face transformers code (frequencies, attention factors, rotation, MLA layouts), HF config
conversion and input validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops import rope as R

H = 16
SCALINGS = {
    "none": None,
    "linear": R.LinearScaling(factor=4.0),
    "dynamic": R.DynamicNTKScaling(factor=3.0),
    "ntk": R.NTKScaling(factor=8.0),
    "llama3": R.Llama3Scaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    ),
    "yarn": R.YarnScaling(factor=4.0, original_max_position_embeddings=32),
    "yarn_deepseek": R.YarnScaling(
        factor=40.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
        mscale=1.0, mscale_all_dim=0.707,
    ),
    "longrope": R.LongRopeScaling(
        short_factor=tuple(1.0 + 0.1 * i for i in range(H // 2)),
        long_factor=tuple(1.0 + 0.7 * i for i in range(H // 2)),
        original_max_position_embeddings=32,
    ),
}  # fmt: skip


def _config(scaling="none", **kw):
    return R.RopeConfig(theta=500.0, scaling=SCALINGS[scaling], max_position_embeddings=64, **kw)


def _random(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _positions(b, t, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))


# Against the formulas.


def test_hand_made_vectors():
    """x = e_0 at position m: split_half puts (cos m, sin m) on dims (0, H/2), interleaved on
    (0, 1); e_1 with interleaved pairs goes to (-sin m, cos m)."""
    m = 3
    e0, e1 = jnp.eye(H)[0].reshape(1, 1, 1, H), jnp.eye(H)[1].reshape(1, 1, 1, H)
    rot = lambda x, layout: np.asarray(
        R.apply_rope(x, jnp.array([[m]]), R.RopeConfig(layout=layout))
    )
    want = np.zeros(H)
    want[[0, H // 2]] = np.cos(m), np.sin(m)
    np.testing.assert_allclose(rot(e0, "split_half").ravel(), want, atol=1e-6)
    np.testing.assert_allclose(rot(e0, "interleaved_to_split_half").ravel(), want, atol=1e-6)
    want = np.zeros(H)
    want[[0, 1]] = -np.sin(m), np.cos(m)
    np.testing.assert_allclose(rot(e1, "interleaved").ravel(), want, atol=1e-6)


def _numpy_rope(x, positions, theta, layout, inv_freq=None):
    """Pair-by-pair float64 rotation: pair i turns by positions * theta ** (-2i / H)."""
    x, out = np.asarray(x, np.float64), np.array(x, np.float64)
    h = x.shape[-1]
    for i in range(h // 2):
        a, b = (i, i + h // 2) if layout == "split_half" else (2 * i, 2 * i + 1)
        oa, ob = (a, b) if layout != "interleaved_to_split_half" else (i, i + h // 2)
        w = theta ** (-2 * i / h) if inv_freq is None else float(inv_freq[i])
        angle = np.asarray(positions, np.float64)[:, :, None] * w
        cos, sin = np.cos(angle), np.sin(angle)
        out[..., oa] = x[..., a] * cos - x[..., b] * sin
        out[..., ob] = x[..., b] * cos + x[..., a] * sin
    return out


@pytest.mark.parametrize("layout", R.LAYOUTS)
def test_matches_closed_form(layout):
    x, pos = _random((2, 5, 3, H)), jnp.array([[0, 1, 2, 9, 40], [7, 3, 100, 5, 1]])
    y = R.apply_rope(x, pos, R.RopeConfig(theta=1000.0, layout=layout))
    np.testing.assert_allclose(y, _numpy_rope(x, pos, 1000.0, layout), atol=3e-5)


@pytest.mark.parametrize("scaling", ["none", "yarn", "llama3", "ntk"])
@pytest.mark.parametrize("layout", R.LAYOUTS)
def test_scores_depend_only_on_relative_position(layout, scaling):
    config = _config(scaling, layout=layout)
    q, k = _random((1, 1, 1, H), 1), _random((1, 1, 1, H), 2)
    score = lambda m, n: float(
        jnp.sum(
            R.apply_rope(q, jnp.array([[m]]), config) * R.apply_rope(k, jnp.array([[n]]), config)
        )
    )
    for m, n in [(5, 2), (0, 9), (30, 30)]:
        for shift in (1, 17, 40):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("layout", R.LAYOUTS)
def test_norm_preserved_and_position_zero_is_identity(layout):
    config = _config("llama3", layout=layout)
    x = _random((2, 6, 3, H))
    y = R.apply_rope(x, _positions(2, 6, start=3), config)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    y0 = R.apply_rope(x, jnp.zeros((2, 6), jnp.int32), config)
    perm = _deinterleave(H) if layout == "interleaved_to_split_half" else np.arange(H)
    np.testing.assert_array_equal(y0, x[..., perm])


def _deinterleave(n):
    return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])


def test_layouts_are_related_by_a_fixed_permutation():
    x, pos = _random((2, 5, 2, H)), _positions(2, 5, start=11)
    perm, inv = _deinterleave(H), np.argsort(_deinterleave(H))
    split = R.apply_rope(x[..., perm], pos, _config(layout="split_half"))
    inter = R.apply_rope(x, pos, _config(layout="interleaved"))
    mla = R.apply_rope(x, pos, _config(layout="interleaved_to_split_half"))
    np.testing.assert_allclose(split[..., inv], inter, atol=1e-6)
    np.testing.assert_allclose(mla, inter[..., perm], atol=1e-6)


@pytest.mark.parametrize("layout", R.LAYOUTS)
def test_partial_rotary_passes_the_rest_through(layout):
    x, pos = _random((1, 4, 2, H)), _positions(1, 4, start=2)
    y = R.apply_rope(x, pos, _config("yarn", rotary_dim=6, layout=layout))
    np.testing.assert_array_equal(y[..., 6:], x[..., 6:])
    full = R.apply_rope(x[..., :6], pos, _config("yarn", layout=layout))
    np.testing.assert_allclose(y[..., :6], full, atol=1e-6)


def test_dtype_kept_and_jit_matches_eager():
    x, pos = _random((2, 8, 2, H)).astype(jnp.bfloat16), _positions(2, 8, start=60)
    config = _config("dynamic")
    eager = R.apply_rope(x, pos, config)
    jitted = jax.jit(R.apply_rope, static_argnums=2)(x, pos, config)
    assert eager.dtype == jnp.bfloat16 and eager.shape == x.shape
    np.testing.assert_array_equal(eager, jitted)


@pytest.mark.parametrize("layout", ["split_half", "interleaved"])
def test_gradient_is_the_inverse_rotation(layout):
    """RoPE is orthogonal, so its VJP rotates the cotangent back (by minus the angle)."""
    x, g, pos = _random((2, 5, 2, H), 1), _random((2, 5, 2, H), 2), _positions(2, 5, start=4)
    config = _config("llama3", layout=layout)
    grad = jax.grad(lambda x: jnp.sum(R.apply_rope(x, pos, config) * g))(x)
    np.testing.assert_allclose(grad, R.apply_rope(g, -pos, config), atol=1e-5)


def test_sharded_inputs_match_unsharded():
    """Batch on 'data' and heads on 'tensor' of the 8 fake devices: same values, same sharding."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    x, pos = _random((2, 6, 4, H)), _positions(2, 6, start=50)
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None, "tensor")))
    pos_sharded = jax.device_put(pos, NamedSharding(mesh, PartitionSpec("data")))
    config = _config("dynamic")
    y = jax.jit(R.apply_rope, static_argnums=2)(x_sharded, pos_sharded, config)
    np.testing.assert_allclose(y, R.apply_rope(x, pos, config), atol=1e-6)
    assert y.sharding.is_equivalent_to(x_sharded.sharding, 4)


def test_dynamic_and_longrope_follow_the_longest_position():
    """Unscaled (dynamic) / short factors (longrope) up to their threshold, rescaled beyond;
    apply_rope takes seq_len = max position + 1 over the whole batch, as HF does."""
    for name in ("dynamic", "longrope"):
        config = _config(name)
        base = R.rope_frequencies(config, H)[0]
        np.testing.assert_array_equal(R.rope_frequencies(config, H, seq_len=32)[0], base)
        long, attention = R.rope_frequencies(config, H, seq_len=101)
        assert not np.allclose(long, base)
        x, pos = _random((2, 3, 1, H)), jnp.array([[0, 1, 2], [98, 99, 100]])
        want = _numpy_rope(x, pos, None, "split_half", inv_freq=long) * attention
        np.testing.assert_allclose(R.apply_rope(x, pos, config), want, atol=1e-4)


def test_static_ntk_is_theta_scaling():
    freq = R.rope_frequencies(_config("ntk"), H)[0]
    want = R.rope_frequencies(R.RopeConfig(theta=500.0 * 8.0 ** (H / (H - 2))), H)[0]
    np.testing.assert_allclose(freq, want, rtol=1e-6)


# Against Hugging Face transformers (torch CPU).


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def _hf_config(hf, config, head_dim=H, cls="LlamaConfig", **kw):
    d = R.rope_config_to_hf(config, head_dim=head_dim)
    return getattr(hf, cls)(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, **d, **kw
    )


def _torch(x, transpose=True):
    import torch

    t = torch.from_numpy(np.asarray(x).copy())
    return t.transpose(1, 2) if transpose else t  # [B, T, N, H] <-> HF's [B, N, T, H]


def _hf_positions(seed=0, hi=120):
    """Two sequences with gaps and a decode-like offset; the largest position exceeds 64."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.sort(rng.integers(0, hi, (2, 9)), axis=-1), jnp.int32)


HF_TYPES = [name for name in SCALINGS if name != "ntk"]  # HF has no static NTK type


@pytest.mark.parametrize("rotary_dim", [None, 8])
@pytest.mark.parametrize("name", HF_TYPES)
def test_frequencies_match_hf(hf, name, rotary_dim):
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

    config = _config(name, rotary_dim=rotary_dim)
    if name == "longrope" and rotary_dim:  # one factor per rotated pair
        s = config.scaling
        short, long = s.short_factor[: rotary_dim // 2], s.long_factor[: rotary_dim // 2]
        scaling = dataclasses.replace(s, short_factor=short, long_factor=long)
        config = dataclasses.replace(config, scaling=scaling)
    hf_config = _hf_config(hf, config)
    init = ROPE_INIT_FUNCTIONS.get(hf_config.rope_parameters["rope_type"])
    init = init or PhiRotaryEmbedding.compute_default_rope_parameters  # honours partial rotary
    for seq_len in (None, 32, 64, 65, 300):
        # The model's forward passes seq_len as a tensor (dynamic NTK is then float32 torch ops).
        want, want_attention = init(
            hf_config, None, seq_len=None if seq_len is None else torch.tensor(seq_len)
        )
        got, attention = R.rope_frequencies(config, H, seq_len)
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want.numpy(), rtol=3e-7, atol=0)  # pow: within an ulp
        assert attention == pytest.approx(want_attention, rel=1e-12)


@pytest.mark.parametrize("name", HF_TYPES)
def test_apply_matches_hf_llama(hf, name):
    """split_half against LlamaRotaryEmbedding (dynamic / longrope updates included) and
    Llama's apply_rotary_pos_emb."""
    from transformers.models.llama import modeling_llama as m

    config = _config(name)
    q, k = _random((2, 9, 4, H), 1), _random((2, 9, 1, H), 2)
    for pos in (_hf_positions(0), _hf_positions(1, hi=30)):
        rotary = m.LlamaRotaryEmbedding(_hf_config(hf, config))  # fresh: HF caches the length
        cos, sin = rotary(_torch(q), _torch(pos, transpose=False))
        want_q, want_k = m.apply_rotary_pos_emb(_torch(q), _torch(k), cos, sin)
        np.testing.assert_allclose(R.apply_rope(q, pos, config), _torch(want_q.numpy()), atol=1e-5)
        np.testing.assert_allclose(R.apply_rope(k, pos, config), _torch(want_k.numpy()), atol=1e-5)


@pytest.mark.parametrize("name", ["none", "yarn", "dynamic"])
def test_partial_rotary_matches_hf_phi3(hf, name):
    """Partial rotary (split_half on the first rotary_dim dims) against Phi-3's apply."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    config = _config(name, rotary_dim=6)
    q, pos = _random((2, 9, 3, H)), _hf_positions()
    hf_config = _hf_config(hf, config)
    rotary = (PhiRotaryEmbedding if name == "none" else LlamaRotaryEmbedding)(hf_config)
    cos, sin = rotary(_torch(q), _torch(pos, transpose=False))
    assert cos.shape[-1] == 6
    want, _ = apply_rotary_pos_emb(_torch(q), _torch(q), cos, sin)
    np.testing.assert_allclose(R.apply_rope(q, pos, config), _torch(want.numpy()), atol=1e-5)


def test_interleaved_partial_matches_hf_gptj(hf):
    import torch
    from transformers.models.gptj import modeling_gptj as m

    rotary_dim, pos = 8, _hf_positions()
    x = _random((2, 9, 3, H))
    table = m.create_sinusoidal_positions(128, rotary_dim)[_torch(pos, transpose=False)]
    sin, cos = torch.split(table, rotary_dim // 2, dim=-1)
    xt = _torch(x, transpose=False)  # GPT-J rotates in [B, T, N, H]
    rot = m.apply_rotary_pos_emb(xt[..., :rotary_dim], sin, cos)
    want = torch.cat([rot, xt[..., rotary_dim:]], dim=-1).numpy()
    hf_dict = {"model_type": "gptj", "rotary_dim": rotary_dim, "n_positions": 128}
    config = R.rope_config_from_hf(hf_dict, H)
    assert config.layout == "interleaved" and config.rotary_dim == rotary_dim
    np.testing.assert_allclose(R.apply_rope(x, pos, config), want, atol=1e-5)


def _deepseek_config(hf, version, **kw):
    rope_scaling = {
        "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8,
    }  # fmt: skip
    cls = hf.DeepseekV3Config if version == 3 else hf.DeepseekV2Config
    return cls(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=H, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=640, rope_scaling=rope_scaling, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("interleave", [True, False])
def test_mla_layout_matches_hf_deepseek_v3(hf, interleave):
    """DeepSeek-V3 q_pe / k_pe: rope_interleave=True reads interleaved pairs and writes them
    de-interleaved; the yarn attention factor and softmax scale are as in HF."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    hf_config = _deepseek_config(hf, 3, rope_interleave=interleave)
    config = R.rope_config_from_hf(hf_config.to_dict(), hf_config.qk_rope_head_dim)
    assert config.layout == ("interleaved_to_split_half" if interleave else "split_half")
    q_pe, k_pe, pos = _random((2, 9, 4, H), 1), _random((2, 9, 1, H), 2), _hf_positions()
    cos, sin = m.DeepseekV3RotaryEmbedding(hf_config)(_torch(q_pe), _torch(pos, transpose=False))
    apply = m.apply_rotary_pos_emb_interleave if interleave else m.apply_rotary_pos_emb
    want_q, want_k = apply(_torch(q_pe), _torch(k_pe), cos, sin)
    np.testing.assert_allclose(R.apply_rope(q_pe, pos, config), _torch(want_q.numpy()), atol=1e-5)
    np.testing.assert_allclose(R.apply_rope(k_pe, pos, config), _torch(want_k.numpy()), atol=1e-5)
    attention = m.DeepseekV3Attention(hf_config, layer_idx=0)
    want_scale = attention.scaling / hf_config.qk_head_dim**-0.5
    assert R.mla_softmax_scale_factor(config) == pytest.approx(want_scale, rel=1e-12)
    assert R.rope_frequencies(config, H)[1] == pytest.approx(
        (0.1 * np.log(40) + 1) / (0.1 * 0.8 * np.log(40) + 1), rel=1e-12
    )


def test_mla_layout_matches_hf_deepseek_v2(hf):
    """DeepSeek-V2 rotates interleaved pairs as complex numbers and keeps the interleaved order."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    hf_config = _deepseek_config(hf, 2)
    config = R.rope_config_from_hf(hf_config.to_dict(), hf_config.qk_rope_head_dim)
    assert config.layout == "interleaved"
    q_pe, k_pe, pos = _random((2, 9, 4, H), 1), _random((2, 9, 1, H), 2), _hf_positions()
    freqs_cis = m.DeepseekV2RotaryEmbedding(hf_config)(_torch(q_pe), _torch(pos, transpose=False))
    want_q, want_k = m.apply_rotary_emb(_torch(q_pe), _torch(k_pe), freqs_cis)
    np.testing.assert_allclose(R.apply_rope(q_pe, pos, config), _torch(want_q.numpy()), atol=1e-5)
    np.testing.assert_allclose(R.apply_rope(k_pe, pos, config), _torch(want_k.numpy()), atol=1e-5)
    scale = m.DeepseekV2Attention(hf_config, layer_idx=0).scaling / hf_config.qk_head_dim**-0.5
    assert R.mla_softmax_scale_factor(config) == pytest.approx(scale, rel=1e-12)


# HF config conversion.

HF_DICTS = {
    "llama3_1": {
        "model_type": "llama", "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3", "rope_theta": 10000, "max_position_embeddings": 163840,
        "rope_scaling": {
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn",
        },
    },
    "qwen2_yarn": {
        "model_type": "qwen2", "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "rope_scaling": {
            "factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn",
        },
    },
    "phi3_longrope": {
        "model_type": "phi3", "rope_theta": 10000.0, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16},
    },
    "v5_dynamic_partial": {
        "model_type": "llama", "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "dynamic", "factor": 2.0, "rope_theta": 50000.0,
            "partial_rotary_factor": 0.25,
        },
    },
    "neox": {"model_type": "gpt_neox", "rotary_pct": 0.25, "rope_theta": 10000},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
}  # fmt: skip


def test_from_hf_reads_real_configs():
    c = R.rope_config_from_hf(HF_DICTS["llama3_1"], 128)
    assert c == R.RopeConfig(
        theta=500000.0, max_position_embeddings=131072, scaling=R.Llama3Scaling(factor=8.0)
    )
    c = R.rope_config_from_hf(HF_DICTS["deepseek_v3"], 64)
    assert c.layout == "interleaved_to_split_half" and c.rotary_dim is None
    assert c.scaling == R.YarnScaling(
        factor=40, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
    )
    assert R.rope_frequencies(c, 64)[1] == 1.0
    assert R.mla_softmax_scale_factor(c) == pytest.approx((0.1 * np.log(40) + 1) ** 2)
    c = R.rope_config_from_hf(HF_DICTS["phi3_longrope"], 64)
    assert c.rotary_dim == 32 and c.scaling.original_max_position_embeddings == 4096
    assert R.rope_frequencies(c, 64)[1] == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    c = R.rope_config_from_hf(HF_DICTS["v5_dynamic_partial"], 64)
    assert (c.theta, c.rotary_dim, c.scaling) == (50000.0, 16, R.DynamicNTKScaling(factor=2.0))
    assert R.rope_config_from_hf(HF_DICTS["neox"], 128).rotary_dim == 32
    assert R.rope_config_from_hf({}, 64) == R.RopeConfig()


@pytest.mark.parametrize("name", ["llama3_1", "deepseek_v3", "qwen2_yarn", "phi3_longrope"])
def test_frequencies_match_hf_at_real_sizes(hf, name):
    """Real configs and head sizes: from_hf then rope_frequencies vs HF on the same dict."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = {k: v for k, v in HF_DICTS[name].items() if k != "model_type"}
    head_dim = 64 if name in ("deepseek_v3", "phi3_longrope") else 128
    cls = hf.Phi3Config if name.startswith("phi3") else hf.LlamaConfig
    extra = {} if cls is hf.Phi3Config else {"head_dim": head_dim}
    hf_config = cls(hidden_size=32 * head_dim, num_attention_heads=32, **extra, **d)
    want, want_attention = ROPE_INIT_FUNCTIONS[hf_config.rope_parameters["rope_type"]](hf_config)
    got, attention = R.rope_frequencies(R.rope_config_from_hf(HF_DICTS[name], head_dim), head_dim)
    np.testing.assert_allclose(got, want.numpy(), rtol=3e-7, atol=0)
    assert attention == pytest.approx(want_attention, rel=1e-12)


@pytest.mark.parametrize("name", sorted(HF_DICTS))
def test_hf_dict_round_trip_is_hf_equivalent(hf, name):
    """to_hf(from_hf(d)) describes the same rope to transformers as d does."""
    d = HF_DICTS[name]
    head_dim = 64
    back = R.rope_config_to_hf(R.rope_config_from_hf(d, head_dim), head_dim=head_dim)
    kw = dict(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim)
    cls = hf.Phi3Config if name.startswith("phi3") else hf.LlamaConfig
    kw.pop("head_dim") if cls is hf.Phi3Config else None
    drop = {"model_type", "rotary_pct"}
    want = cls(**kw, **{k: v for k, v in d.items() if k not in drop})
    if name == "neox":
        want.rope_parameters["partial_rotary_factor"] = 0.25
    got = cls(
        **kw, **back, original_max_position_embeddings=d.get("original_max_position_embeddings")
    )
    yarn_defaults = {"beta_fast": 32, "beta_slow": 1, "truncate": True}
    norm = lambda p: {
        **(yarn_defaults if p["rope_type"] == "yarn" else {}),
        **{k: v for k, v in p.items() if k != "type"},
    }
    assert norm(got.rope_parameters) == norm(want.rope_parameters)


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("layout", R.LAYOUTS)
def test_config_round_trip(name, layout):
    for rotary_dim in (None, H):
        config = _config(name, layout=layout, rotary_dim=rotary_dim if name != "longrope" else None)
        back = R.rope_config_from_hf(
            R.rope_config_to_hf(config, head_dim=2 * H), 2 * H, layout=layout
        )
        if name == "ntk":  # HF has no static NTK: folded into rope_theta, same frequencies
            assert back.scaling is None
            np.testing.assert_allclose(
                R.rope_frequencies(back, 2 * H)[0], R.rope_frequencies(config, 2 * H)[0], rtol=1e-6
            )
        else:
            assert back == config
    hf_keys = R.rope_config_to_hf(_config(name, layout=layout), head_dim=H)
    assert hf_keys.get("rope_interleave", True) == (layout != "split_half")
    if layout != "interleaved":  # no HF key: the model type says it (GPT-J, DeepSeek-V2)
        assert R.rope_config_from_hf({**hf_keys, "model_type": "deepseek_v3"}, H).layout == layout


def test_partial_rotary_factor_survives_hf_rounding():
    """HF takes int(head_dim * partial_rotary_factor); 30 / 44 * 44 rounds down to 29.99..."""
    for rotary_dim, head_dim in [(30, 44), (26, 46), (6, 47), (32, 128)]:
        d = R.rope_config_to_hf(R.RopeConfig(rotary_dim=rotary_dim), head_dim=head_dim)
        assert int(head_dim * d["partial_rotary_factor"]) == rotary_dim
        assert R.rope_config_from_hf(d, head_dim).rotary_dim == rotary_dim


# Bad input.

_X, _POS = jnp.zeros((2, 3, 1, H)), jnp.zeros((2, 3), jnp.int32)


def _rope(x=_X, pos=_POS, **config):
    return R.apply_rope(x, pos, R.RopeConfig(**config))


BAD_INPUTS = {
    "rotary_dim_odd": (lambda: R.RopeConfig(rotary_dim=7), "rotary_dim"),
    "rotary_dim_zero": (lambda: R.RopeConfig(rotary_dim=0), "rotary_dim"),
    "rotary_dim_gt_head": (lambda: _rope(rotary_dim=2 * H), "rotary_dim"),
    "odd_head_dim": (lambda: _rope(x=jnp.zeros((2, 3, 1, 5))), "rotary_dim"),
    "layout": (lambda: R.RopeConfig(layout="deepseek"), "layout"),
    "scaling_type": (lambda: R.RopeConfig(scaling={"rope_type": "linear"}), "scaling"),
    "theta_zero": (lambda: R.RopeConfig(theta=0.0), "theta"),
    "theta_negative": (lambda: R.RopeConfig(theta=-1.0), "theta"),
    "factor_zero": (lambda: R.LinearScaling(factor=0.0), "factor"),
    "factor_negative_yarn": (lambda: R.YarnScaling(factor=-2.0), "factor"),
    "factor_nan_llama3": (lambda: R.Llama3Scaling(factor=float("nan")), "factor"),
    "high_le_low": (
        lambda: R.Llama3Scaling(low_freq_factor=4.0, high_freq_factor=4.0),
        "high_freq_factor",
    ),
    "dynamic_without_max": (
        lambda: R.RopeConfig(scaling=R.DynamicNTKScaling(factor=2.0)),
        "max_position_embeddings",
    ),
    "longrope_length": (lambda: R.rope_frequencies(_config("longrope"), 2 * H), "short_factor"),
    "positions_shape": (lambda: _rope(pos=jnp.zeros((2, 4), jnp.int32)), "positions_BT"),
    "positions_rank": (lambda: _rope(pos=jnp.zeros((2, 3, 1), jnp.int32)), "positions_BT"),
    "positions_float": (lambda: _rope(pos=_POS.astype(jnp.float32)), "positions_BT"),
    "x_rank": (lambda: _rope(x=_X[0]), "x_BTNH"),
    "head_dim": (lambda: R.rope_frequencies(_config(), 0), "head_dim"),
    "hf_rope_type": (
        lambda: R.rope_config_from_hf({"rope_scaling": {"type": "mrope"}}, H),
        "rope_type",
    ),
    "to_hf_head_dim": (lambda: R.rope_config_to_hf(R.RopeConfig(rotary_dim=8)), "head_dim"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(name):
    fn, argument = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=argument):
        fn()
