"""LoRA-SB (PAPERS.md §7; the whole-model no-op / merge is in test_seed_methods_model): at
initialisation a·r·b is the best rank-k approximation (truncated SVD, Eckart-Young) of the
first full fine-tuning update ΔW₁ = −η·sign(ΣG) from gradients taken
independently here; only r (k² per matrix) trains and its gradient is aᵀ·∂L/∂W·bᵀ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import Linear
from jaxattn.lowrank.methods.lorasb import LoRASBConfig, lora_sb_init
from train.optim import assign_rules

K = 2


class Tiny(nnx.Module):
    """Two projections with multi-dim in/out shapes and a nonlinearity between them."""

    def __init__(self):
        self.up = Linear((8,), (2, 3), axes=("embed", None, None), rngs=nnx.Rngs(0))
        self.down = Linear((2, 3), (5,), axes=(None, None, "embed"), rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def _mse(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


# models are built, called, merged and differentiated in compiled programs (eagerly, every op
# compiles); inputs are numpy draws (no per-shape device compiles)
_fwd = nnx.jit(lambda m, x: m(x))


def _in_jit(fn):
    """``fn(model)`` (apply / merge / unmerge) in one compiled program; its paths dropped."""
    return nnx.jit(lambda m: (fn(m), None)[1])


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((6, 8), np.float32), rng.standard_normal((6, 5), np.float32))
               for _ in range(2)]  # fmt: skip
    plain = nnx.jit(Tiny)()
    grad = nnx.jit(nnx.grad(_mse))
    g = jax.tree.map(np.add, *[nnx.to_pure_dict(grad(plain, b)) for b in batches])  # full FT
    want = {"up": np.asarray(g["up"]["kernel"]), "down": np.asarray(g["down"]["kernel"])}
    model = nnx.clone(plain)
    base = _fwd(model, batches[0][0])
    cfg = lr.AdapterConfig(method="lorasb", options={"rank": K, "lr": 1e-3}, targets=".*")
    _in_jit(lambda m: lr.apply(m, cfg, rngs=nnx.Rngs(1)))(model)
    return model, base, batches, want


def test_noop_before_init_then_truncated_svd_of_first_update(setup):
    model, base, batches, grads = setup
    x0 = batches[0][0]
    np.testing.assert_array_equal(np.asarray(_fwd(model, x0)), np.asarray(base))
    updates = lora_sb_init(model, _mse, batches)
    assert sorted(updates) == ["down", "up"]
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
    # the SGD variant: the truncated SVD of −η·ΣG itself
    sgd = nnx.clone(model)
    for lin in lr.linear_paths(sgd).values():
        lin.adapter.adapters["default"].update = "sgd"
    for path, upd in lora_sb_init(sgd, _mse, batches).items():
        lin = lr.linear_paths(sgd)[path]
        g = -1e-3 * grads[path].reshape(lin.fan_in, lin.fan_out)
        np.testing.assert_allclose(np.asarray(upd).reshape(g.shape), g, rtol=1e-6, atol=1e-12)
        u, s, vh = np.linalg.svd(g, full_matrices=False)
        dk = np.asarray(lin.adapter.adapters["default"].delta_kernel(None)).reshape(g.shape)
        np.testing.assert_allclose(dk, (u[:, :K] * s[:K]) @ vh[:K], rtol=1e-4, atol=1e-9)
    # the adapted model starts at W + [ΔW₁]_k: the merged kernels give its logits
    adapted = _fwd(model, x0)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-6
    _in_jit(lr.merge)(model)
    np.testing.assert_allclose(np.asarray(_fwd(model, x0)), np.asarray(adapted),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    _in_jit(lr.unmerge)(model)


def test_only_r_trains_and_its_gradient_is_the_projected_full_gradient():
    lin = Linear((8,), (6,), axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    cfg = LoRASBConfig(rank=2)
    lr.attach(lin, ".*", lambda p, linear: cfg.build("q", linear, rngs=nnx.Rngs(1)))
    ad = lin.adapter
    ad.r[...] = jnp.array([[0.3, -0.1], [0.2, 0.5]])
    x = np.random.default_rng(0).standard_normal((5, 8), np.float32)
    y = np.random.default_rng(1).standard_normal((5, 6), np.float32)

    def loss(m):
        return jnp.sum((m(x) - y) ** 2)

    g = nnx.jit(nnx.grad(loss))(lin)
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
