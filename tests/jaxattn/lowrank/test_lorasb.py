"""LoRA-SB (PAPERS.md §7): at initialisation a·r·b is the best rank-k approximation (truncated
SVD, Eckart-Young) of the first full fine-tuning update ΔW₁ = −η·sign(ΣG) from gradients taken
independently here; only r (k² per matrix) trains and its gradient is aᵀ·∂L/∂W·bᵀ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import Linear
from jaxattn.lowrank.methods.lorasb import LoRASBConfig, lora_sb_init
from models import DecoderLM, get_config
from train.optim import assign_rules

K, TARGETS = 3, r"attn/q$|mlp/down$"


def _nll(model, tokens):
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


@pytest.fixture(scope="module")
def setup():
    cfg = get_config("llama-tiny", num_layers=1)
    batches = [jax.random.randint(jax.random.key(i), (2, 9), 0, 256) for i in (3, 4)]
    plain = DecoderLM(cfg, rngs=nnx.Rngs(0))
    grad = nnx.jit(nnx.grad(_nll))
    g = jax.tree.map(jnp.add, *[grad(plain, b) for b in batches])  # full fine-tuning grads
    flat = {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(g)}
    want = {p: np.asarray(flat[f"{p}/kernel"]) for p in lr.linear_paths(plain)}
    model = nnx.clone(plain)
    base = model(batches[0][:, :-1])
    lr.apply(model, lr.AdapterConfig(method="lorasb", options={"rank": K, "lr": 1e-3},
                                     targets=TARGETS), rngs=nnx.Rngs(1))  # fmt: skip
    return model, base, batches, want


def test_noop_before_init_then_truncated_svd_of_first_update(setup):
    model, base, batches, grads = setup
    np.testing.assert_array_equal(np.asarray(model(batches[0][:, :-1])), np.asarray(base))
    updates = lora_sb_init(model, _nll, batches)
    assert sorted(updates) == ["layers/0/attn/q", "layers/0/mlp/down"]
    for path, lin in lr.linear_paths(model).items():
        if path not in updates:
            continue
        g = grads[path].reshape(lin.fan_in, lin.fan_out)
        upd = -1e-3 * np.sign(g)  # Adam's first step, as the official code
        np.testing.assert_allclose(np.asarray(updates[path]).reshape(g.shape), upd, atol=1e-9)
        u, s, vh = np.linalg.svd(upd, full_matrices=False)
        best = (u[:, :K] * s[:K]) @ vh[:K]
        dk = np.asarray(lin.adapter.adapters["default"].delta_kernel(None)).reshape(g.shape)
        np.testing.assert_allclose(dk, best, rtol=1e-4, atol=1e-7)
        # Eckart-Young: the residual is the tail of the spectrum, below any other rank-k
        # matrix, e.g. the update projected on a random k-dim input subspace
        resid = np.linalg.norm(upd - dk) ** 2
        np.testing.assert_allclose(resid, np.sum(s[K:] ** 2), rtol=1e-4)
        q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(g.shape[0], K)))
        assert np.linalg.norm(upd - q @ (q.T @ upd)) ** 2 > resid * 1.01
    # the adapted model starts at W + [ΔW₁]_k: the merged kernels give its logits
    adapted = model(batches[0][:, :-1])
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-6
    lr.merge(model)
    np.testing.assert_allclose(np.asarray(model(batches[0][:, :-1])), np.asarray(adapted),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    lr.unmerge(model)


def test_only_r_trains_and_its_gradient_is_the_projected_full_gradient():
    lin = Linear((8,), (6,), axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    cfg = LoRASBConfig(rank=2)
    lr.attach(lin, ".*", lambda p, linear: cfg.build("q", linear, rngs=nnx.Rngs(1)))
    ad = lin.adapter
    ad.r[...] = jnp.array([[0.3, -0.1], [0.2, 0.5]])
    x = jax.random.normal(jax.random.key(0), (5, 8))
    y = jax.random.normal(jax.random.key(1), (5, 6))

    def loss(m):
        return jnp.sum((m(x) - y) ** 2)

    g = nnx.grad(loss)(lin)
    gw, gr = np.asarray(g.kernel[...]), np.asarray(g.adapter.r[...])
    a, b = np.asarray(ad.a[...]), np.asarray(ad.b[...])
    np.testing.assert_allclose(gr, a.T @ gw @ b.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.T @ a, np.eye(2), atol=1e-5)  # orthonormal bases
    # the method's rules train r alone: k² per adapted matrix
    paths = ["layers/0/attn/q/kernel"] + [
        f"layers/0/attn/q/adapter/adapters/default/{n}" for n in ("a", "r", "b")
    ]
    rules = assign_rules(cfg.training_rules(), paths)
    trained = [p for p, r in rules.items() if r.name == "adamw"]
    assert trained == ["layers/0/attn/q/adapter/adapters/default/r"]
    assert ad.r[...].size == 2**2


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(rank=0), "rank=0"),
        (dict(rank=7), r"rank=7 .*\[1, 6\]"),
        (dict(rank=2, lr=0.0), "lr must be a number > 0"),
        (dict(rank=2, update="adamw"), r"update must be one of \('adam', 'sgd'\)"),
    ],
)
def test_bad_config(fields, match):
    lin = Linear((8,), (6,), axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        LoRASBConfig(**fields).build("q", lin, rngs=nnx.Rngs(0))


def test_init_needs_a_lorasb_adapter():
    model = nnx.List([Linear((8,), (6,), axes=("embed", "mlp"), rngs=nnx.Rngs(0))])
    lr.apply(model, lr.AdapterConfig(options={"rank": 2}, targets=".*"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no projection holds a lorasb adapter"):
        lora_sb_init(model, lambda m, b: jnp.sum(m[0](b)), jnp.ones((2, 8)))

