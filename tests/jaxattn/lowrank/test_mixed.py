"""lora_bank / stack_adapters: a mixed-adapter batch equals each sequence run alone with its
own single LoRA adapter (delta = scale * x @ a @ b, Hu et al. 2021), -1 rows equal the base
model, padded ranks change nothing; also through jaxattn.generate (the decode cache path)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import lowrank
from jaxattn.generate import generate
from jaxattn.layers import AdapterParam, Context
from jaxattn.lowrank import LoRABank, stack_adapters, unstack
from models import DecoderLM, get_config

PATTERN = r"(attn/(q|k|v|o)|mlp/(gate|up|down))$"
RANKS = (2, 4, 3)


class RefLoRA(nnx.Module):
    """The reference single adapter: delta = scale * (x @ a) @ b, a [*in, r], b [r, *out]."""

    def __init__(self, a, b, scale):
        self.a, self.b, self.scale = AdapterParam(a), AdapterParam(b), float(scale)

    def delta(self, x, ctx, *, base=None):
        n_in = self.a.ndim - 1
        a = self.a[...].reshape(-1, self.a.shape[-1])
        h = x.reshape(*x.shape[: x.ndim - n_in], -1) @ a
        y = (h @ self.b[...].reshape(self.b.shape[0], -1)) * self.scale
        return y.reshape(*x.shape[: x.ndim - n_in], *self.b.shape[1:])

    def delta_kernel(self, base):
        return jnp.tensordot(self.a[...], self.b[...], 1) * self.scale


@nnx.jit
def _model():
    """A 1-layer llama-tiny, initialised in one compiled program (eagerly, every op compiles)."""
    return DecoderLM(get_config("llama-tiny", num_layers=1), rngs=nnx.Rngs(0))


@nnx.jit
def _logits(model, tokens_BT, sequence_ids_B=None):
    """The model's logits in one compiled program (eager calls compile every op)."""
    return model(tokens_BT, sequence_ids_B=sequence_ids_B)


def _factors(model):
    """{path: [(a, b, scale) per adapter]} with non-zero random factors of ranks RANKS."""
    out = {}
    rng = np.random.default_rng(7)  # numpy draws: no per-shape device compiles
    for path, lin in lowrank.linear_paths(model).items():
        out[path] = []
        for r in RANKS:
            a = rng.standard_normal((*lin.in_shape, r), np.float32) / np.sqrt(lin.fan_in)
            b = rng.standard_normal((r, *lin.out_shape), np.float32) * 0.5
            out[path].append((jnp.asarray(a), jnp.asarray(b), 2.0 / r))
    return out


@pytest.fixture(scope="module")
def setup():
    base = _model()
    facs = _factors(base)
    bank = _model()
    lowrank.attach(bank, PATTERN, lambda p, lin: stack_adapters(facs[p], linear=lin))
    singles = []
    for i in range(len(RANKS)):
        m = _model()
        lowrank.attach(m, PATTERN, lambda p, lin, i=i: RefLoRA(*facs[p][i]))
        singles.append(m)
    return base, bank, singles, facs


TOKENS = np.array([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [3, 3, 4, 4, 9]], np.int32)
IDS = np.array([2, 0, -1, 1], np.int32)


def _alone(base, singles, ids, tokens):
    rows = []
    for b, i in enumerate(ids):
        m = base if i < 0 else singles[i]
        rows.append(np.asarray(_logits(m, jnp.asarray(tokens[b : b + 1])))[0])
    return np.stack(rows)


def test_mixed_batch_equals_each_sequence_alone(setup):
    base, bank, singles, _ = setup
    want = _alone(base, singles, IDS, TOKENS)
    got = np.asarray(bank(jnp.asarray(TOKENS), sequence_ids_B=jnp.asarray(IDS)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # the adapters really change the output (non-zero factors, distinct per adapter)
    assert np.abs(want[0] - np.asarray(_logits(base, jnp.asarray(TOKENS[:1])))[0]).max() > 1e-2
    np.testing.assert_allclose(  # -1 row: exactly the base model (alone, row 2 is the base's)
        got[2], want[2], rtol=1e-6, atol=1e-6
    )
    got_jit = np.asarray(_logits(bank, jnp.asarray(TOKENS), jnp.asarray(IDS)))
    np.testing.assert_allclose(got_jit, want, rtol=2e-5, atol=2e-5)


def test_generate_decode_path_per_row_adapters(setup):
    base, bank, singles, _ = setup
    prompt, lens = TOKENS[:, :4], np.array([4, 3, 4, 2])
    kw = dict(max_new_tokens=4, rng=jax.random.key(0))
    out = generate(bank, prompt, lens, sequence_ids_B=IDS, **kw)
    for b, i in enumerate(IDS):
        m = base if i < 0 else singles[i]
        alone = generate(m, prompt[b : b + 1], lens[b : b + 1], **kw)
        np.testing.assert_array_equal(np.asarray(out.tokens_BS[b]), np.asarray(alone.tokens_BS[0]))


def test_padded_ranks_exact_and_unstack_roundtrip(setup):
    _, _, _, facs = setup
    path = "layers/0/mlp/up"
    bank = stack_adapters(facs[path])
    assert bank.max_rank == 4 and bank.ranks == RANKS and bank.a.shape == (3, 64, 4)
    x = jax.random.normal(jax.random.key(1), (3, 5, 64))
    ctx = Context.create(3, 5, sequence_ids_B=jnp.array([0, 1, 2]))
    got = bank.delta(x, ctx)
    for i, (a, b, s) in enumerate(facs[path]):
        np.testing.assert_allclose(got[i], (x[i] @ a @ b) * s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bank.delta_kernel_of(i), (a @ b) * s, rtol=1e-5, atol=1e-6)
    for (a, b, s), (a2, b2, s2) in zip(facs[path], unstack(bank), strict=True):
        np.testing.assert_array_equal(a, a2)
        np.testing.assert_array_equal(b, b2)
        assert s == pytest.approx(s2)
    # objects with a / b / scale attributes (nnx Params) stack too
    again = stack_adapters([RefLoRA(*t) for t in facs[path]])
    np.testing.assert_array_equal(again.a[...], bank.a[...])


def test_registered_method_builds_a_zero_delta_bank():
    cfg = lowrank.make_method("lora_bank", num_adapters=3, rank=(2, 4, 1), alpha=4.0)
    model = _model()
    lin = lowrank.linear_paths(model)["layers/0/attn/q"]
    cfg.validate("layers/0/attn/q", lin)
    bank = cfg.build("layers/0/attn/q", lin, rngs=nnx.Rngs(1))
    assert bank.a.shape == (3, 64, 4) and bank.b.shape == (3, 4, 4, 16)
    np.testing.assert_allclose(bank.scale[...], [2.0, 1.0, 4.0])
    assert not np.asarray(bank.a[...][2, :, 1:]).any()  # padded slots start at zero
    assert isinstance(bank.a, AdapterParam) and not isinstance(bank.scale, nnx.Param)
    x = jnp.ones((2, 3, 64))
    assert not np.asarray(bank.delta(x, Context.create(2, 3, sequence_ids_B=[0, 2]))).any()
    with pytest.raises(ValueError, match="rank"):
        lowrank.make_method("lora_bank", num_adapters=3, rank=(2, 4)).validate("q", lin)
    with pytest.raises(ValueError, match="rank"):
        lowrank.make_method("lora_bank", num_adapters=1, rank=65).validate("q", lin)


def test_bad_input_errors(setup):
    _, _, _, facs = setup
    bank = stack_adapters(facs["layers/0/mlp/up"])
    x = jnp.ones((2, 3, 64))
    with pytest.raises(ValueError, match="sequence_ids_B"):
        bank.delta(x, Context.create(2, 3))
    with pytest.raises(ValueError, match="sequence_ids_B"):
        bank.delta(x, None)
    with pytest.raises(ValueError, match=r"sequence_ids_B must lie in \[-1, 2\]"):
        bank.delta(x, Context.create(2, 3, sequence_ids_B=[0, 3]))
    with pytest.raises(ValueError, match=r"sequence_ids_B must lie"):
        bank.delta(x, Context.create(2, 3, sequence_ids_B=[-2, 0]))
    with pytest.raises(ValueError, match=r"sequence_ids_B must be int \[2\]"):
        bank.delta(x, Context(positions_BT=jnp.zeros((2, 3), jnp.int32),
                              sequence_ids_B=jnp.array([0, 1, 2])))  # fmt: skip
    with pytest.raises(ValueError, match="delta_kernel_of"):
        bank.delta_kernel(jnp.zeros((64, 128)))
    with pytest.raises(ValueError, match="adapter index"):
        bank.delta_kernel_of(3)
    # under jit an out-of-range id cannot raise: its row is NaN, the others are fine
    f = jax.jit(lambda s: bank.delta(x, Context(positions_BT=jnp.zeros((2, 3), jnp.int32),
                                                sequence_ids_B=s)))  # fmt: skip
    y = np.asarray(f(jnp.array([5, 0])))
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    with pytest.raises(ValueError, match="same r"):
        stack_adapters([(jnp.ones((64, 2)), jnp.ones((3, 128)), 1.0)])
    with pytest.raises(ValueError, match="one projection"):
        stack_adapters([(jnp.ones((64, 2)), jnp.ones((2, 128)), 1.0),
                        (jnp.ones((32, 2)), jnp.ones((2, 128)), 1.0)])  # fmt: skip
    with pytest.raises(ValueError, match="at least one"):
        stack_adapters([])
    with pytest.raises(ValueError, match="unstack needs a LoRABank"):
        unstack(object())


def test_single_adapter_bank_needs_no_ids(setup):
    _, _, _, facs = setup
    a, b, s = facs["layers/0/mlp/up"][1]
    bank = stack_adapters([(a, b, s)])
    x = jax.random.normal(jax.random.key(2), (2, 3, 64))
    np.testing.assert_allclose(bank.delta(x, None), (x @ a @ b) * s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bank.delta_kernel(jnp.zeros((64, 128))), (a @ b) * s, rtol=1e-5)
    assert isinstance(bank, LoRABank)


def test_mix_of_applied_lora_adapters_equals_set_active_per_sequence():
    """Three LoRA adapters applied by name (different ranks and targets' scales), mixed into
    one bank per projection: each row equals the model with only its adapter active."""
    model = DecoderLM(get_config("llama-tiny", num_layers=1), rngs=nnx.Rngs(0))
    for i, (name, rank) in enumerate([("x", 2), ("y", 4), ("z", 3)]):
        cfg = lowrank.AdapterConfig(name=name, options={"rank": rank, "alpha": 2.0 * rank},
                                    targets=r"attn/(q|v)$|mlp/down$")  # fmt: skip
        lowrank.apply(model, cfg, rngs=nnx.Rngs(i + 1))
    for path, v in nnx.to_flat_state(nnx.state(model, AdapterParam)):
        v.set_value(0.1 * jax.random.normal(jax.random.key(hash(path) % 1000), v.shape))
    tokens = jnp.asarray(np.arange(4 * 6).reshape(4, 6) % 97, jnp.int32)
    alone = []
    for row, name in enumerate(["z", "x", None, "y"]):
        with lowrank.disabled(model) if name is None else contextlib.nullcontext():
            if name is not None:
                lowrank.set_active(model, name)
            alone.append(np.asarray(_logits(model, tokens[row : row + 1]))[0])
    paths = lowrank.mix(model, ["x", "y", "z"])
    assert len(paths) == 3
    mixed = np.asarray(_logits(model, tokens, jnp.array([2, 0, -1, 1], jnp.int32)))
    np.testing.assert_allclose(mixed, np.stack(alone), rtol=2e-5, atol=2e-5)
    assert not np.allclose(alone[0], alone[1], atol=1e-3)  # the adapters differ
    with pytest.raises(ValueError, match="already has an adapter named 'mixed'"):
        lowrank.mix(model, ["x", "y"])
    with pytest.raises(ValueError, match="no projection holds"):
        lowrank.mix(model, ["w"], name="m2")
