"""Linear and the adapter slot: one rule adapts every projection of every kind, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import lowrank
from jaxattn.layers import AdapterParam, Linear
from models import DecoderLM, LayerSpec, get_config

X = jax.random.normal(jax.random.key(0), (2, 5, 6))


class LowRankDelta(nnx.Module):
    """A test-local adapter: ΔW = A·B (A [*in, R], B [R, *out]), scaled by ``scale``."""

    def __init__(self, linear: Linear, rank: int, key, scale: float = 1.0):
        ka, kb = jax.random.split(key)
        self.a = AdapterParam(jax.random.normal(ka, (*linear.in_shape, rank)) * 0.1)
        self.b = AdapterParam(jax.random.normal(kb, (rank, *linear.out_shape)) * 0.1 * scale)
        self.n_in = len(linear.in_shape)

    def delta(self, x, ctx, *, base):
        a = self.a[...].reshape(-1, self.b.shape[0]).astype(x.dtype)
        h = x.reshape(*x.shape[: x.ndim - self.n_in], -1) @ a
        return jnp.tensordot(h, self.b[...].astype(x.dtype), axes=1)

    def delta_kernel(self, base):
        return jnp.tensordot(self.a[...], self.b[...], axes=1).astype(base.dtype)


def _adapter_factory(scale=1.0, rank=2):
    counter = iter(range(10_000))
    return lambda path, lin: LowRankDelta(lin, rank, jax.random.key(next(counter)), scale)


def test_linear_matches_einsum_and_records_fan_in():
    lin = Linear((6,), (3, 4), axes=("embed", "heads", "head_dim"), use_bias=True, rngs=nnx.Rngs(0))
    w = lin.kernel[...]
    np.testing.assert_allclose(lin(X), jnp.einsum("btd,dnh->btnh", X, w), atol=1e-6)
    assert lin.kernel.get_metadata()["fan_in_axes"] == 1
    assert lin.as_matrix().shape == (6, 12) and (lin.fan_in, lin.fan_out) == (6, 12)
    out = Linear((3, 4), (6,), axes=("heads", "head_dim", "embed"), rngs=nnx.Rngs(1))
    assert out.kernel.get_metadata()["fan_in_axes"] == 2
    with pytest.raises(ValueError, match="in_shape"):
        lin(jnp.zeros((2, 5, 7)))


def test_adapter_delta_equals_its_kernel_and_effective_kernel_folds_it():
    lin = Linear((6,), (3, 4), axes=("embed", "heads", "head_dim"), rngs=nnx.Rngs(0))
    base = lin(X)
    lin.adapter = LowRankDelta(lin, 2, jax.random.key(1))
    want = jnp.einsum("btd,dnh->btnh", X, lin.effective_kernel())
    np.testing.assert_allclose(lin(X), want, atol=1e-5)
    assert not np.allclose(lin(X), base)
    np.testing.assert_array_equal(lin.base_kernel(), lin.kernel[...])


def _mixed_config(**kw):
    # mla-tiny-shaped model whose layers alternate MLA and GQA attention
    return get_config(
        "deepseek-tiny",
        arch="deepseek_v3",
        num_layers=4,
        layer_pattern=(LayerSpec.of("mla"), LayerSpec.of("mha", num_kv_heads=2)),
        implementation="xla",
        **kw,
    )


def test_one_rule_adapts_every_projection_of_every_kind():
    model = DecoderLM(_mixed_config(tie_embeddings=True), rngs=nnx.Rngs(0))
    paths = lowrank.attach(model, ".*", _adapter_factory())
    mla = {"q_a", "q_b", "kv_a", "k_b", "v_b", "o"}
    mha = {"q", "k", "v", "o"}
    want = {"lm_head"}
    for i in range(4):
        want |= {f"layers/{i}/attn/{p}" for p in (mla if i % 2 == 0 else mha)}
        want |= {f"layers/{i}/mlp/{p}" for p in ("gate", "up", "down")}
    assert set(paths) == want
    adapter_leaves = jax.tree.leaves(nnx.state(model, AdapterParam))
    assert len(adapter_leaves) == 2 * len(want)
    with pytest.raises(ValueError, match="already have an adapter"):
        lowrank.attach(model, "lm_head", _adapter_factory())
    assert lowrank.detach(model, "mlp") == [p for p in paths if "/mlp/" in p]


def test_pattern_matching_nothing_lists_close_matches():
    model = DecoderLM(get_config("llama-tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"matches no projection.*layers/0/attn/q"):
        lowrank.attach(model, "layers/0/atn/q$", _adapter_factory())
    with pytest.raises(ValueError, match="regular expression"):
        lowrank.attach(model, "(", _adapter_factory())


@pytest.mark.parametrize("name", ["llama-tiny", "deepseek-tiny", "mixed"])
def test_zero_adapter_is_bit_identical(name):
    config = _mixed_config() if name == "mixed" else get_config(name)
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 256)
    before = np.asarray(model(tokens))
    lowrank.attach(model, ".*", _adapter_factory(scale=0.0))
    np.testing.assert_array_equal(np.asarray(model(tokens)), before)


def test_merged_effective_kernels_give_the_adapted_logits():
    model = DecoderLM(_mixed_config(), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, 256)
    lowrank.attach(model, ".*", _adapter_factory())
    adapted = np.asarray(model(tokens))
    plain = DecoderLM(_mixed_config(), rngs=nnx.Rngs(0))
    merged = {p: lin.effective_kernel() for p, lin in lowrank.linear_paths(model).items()}
    for path, lin in lowrank.linear_paths(plain).items():
        lin.kernel[...] = merged[path]
    np.testing.assert_allclose(np.asarray(plain(tokens)), adapted, atol=1e-5)


def test_absorbed_mla_decoding_reads_the_adapted_kernels():
    model = DecoderLM(get_config("deepseek-tiny", implementation="xla"), rngs=nnx.Rngs(0))
    lowrank.attach(model, "attn/(k_b|v_b)$", _adapter_factory(scale=3.0))
    tokens = jax.random.randint(jax.random.key(4), (1, 9), 0, 256)
    full = np.asarray(model(tokens))
    cache = model.init_cache(1, 16, jnp.float32)
    prefill, cache = model.decode(tokens[:, :5], cache)
    steps = []
    for t in range(5, 9):
        logits, cache = model.decode(tokens[:, t : t + 1], cache)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.asarray(prefill), full[:, :5], atol=1e-4)
    np.testing.assert_allclose(np.stack(steps, 1), full[:, 5:], atol=1e-4)


def test_tied_head_is_a_view_of_the_embedding_table():
    model = DecoderLM(get_config("qwen2-tiny"), rngs=nnx.Rngs(0))  # tie_embeddings=True
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert "embed/table" in paths and not any(p.startswith("lm_head") for p in paths)
    assert model.lm_head.kernel is model.embed.table
    x = jax.random.normal(jax.random.key(5), (1, 3, 64))
    np.testing.assert_allclose(model.lm_head(x), x @ model.embed.table[...].T, atol=1e-5)


def test_to_hf_merges_adapters_and_refuses_what_it_cannot_hold(tmp_path):
    from models import from_hf, to_hf

    model = DecoderLM(get_config("llama-tiny"), rngs=nnx.Rngs(0))
    lowrank.attach(model, "attn/(q|v)$|mlp/down$|lm_head", _adapter_factory())
    tokens = jax.random.randint(jax.random.key(6), (1, 6), 0, 256)
    to_hf(model, str(tmp_path / "merged"))
    np.testing.assert_allclose(from_hf(str(tmp_path / "merged"))(tokens), model(tokens), atol=1e-5)

    class Unmergeable(LowRankDelta):
        def delta_kernel(self, base):
            raise NotImplementedError("input-dependent")

    lowrank.detach(model, "attn/q$")
    lowrank.attach(model, "layers/0/attn/q$", lambda p, lin: Unmergeable(lin, 2, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"layers/0/attn/q: its adapter cannot be merged"):
        to_hf(model, str(tmp_path / "refused"))
    tied = DecoderLM(get_config("qwen2-tiny"), rngs=nnx.Rngs(0))
    lowrank.attach(tied, "lm_head", _adapter_factory())
    with pytest.raises(ValueError, match="lm_head: an adapter on the tied head"):
        to_hf(tied, str(tmp_path / "tied"))
