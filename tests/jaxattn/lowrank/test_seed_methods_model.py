"""Hydra, NOLA, RandLoRA, DyLoRA, SoRA, LoRA-SB, IncreLoRA, LoRAPrune and MoLoRA (one LoRA) on a
tiny DecoderLM (built, adapted and called in jitted programs; DyLoRA has its own jit train
step): a no-op at attach, and after their zero-initialized factor is set, the merged model
(effective kernels, adapters detached) gives the unmerged model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lowrank as lr
from jaxattn.layers import AdapterParam
from models import DecoderLM, get_config

CASES = {
    "hydra": dict(rank=2, seq_rank=2),
    "nola": dict(rank=2, num_basis_a=4, num_basis_b=4),
    "randlora": dict(rank=16, alpha=32.0),
    "dylora": dict(rank=4),
    "sora": dict(rank=4),
    "lorasb": dict(rank=2),
    "increlora": dict(rank=1, max_rank=3, target_rank=2, add_rank=1),
    "loraprune": dict(rank=2, prune="attn/(q|o)$|mlp/down$"),
    "molora": dict(num_adapters=1, rank=2),
}


def _wake(model):
    """Give every adapter param a nonzero random value (zero-init factors included)."""
    state = nnx.state(model, AdapterParam)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(11)  # numpy draws: no per-shape device compiles
    new = [jnp.asarray(0.05 * rng.standard_normal(v.shape).astype(v.dtype) + np.asarray(v))
           for v in leaves]  # fmt: skip
    nnx.update(model, jax.tree.unflatten(tree, new))


# one compiled program each (eagerly, every op compiles): the model's init (the same
# parameters as the eager build), its forward (one compile per adapted structure), the attach
# and the effective kernels
_model = nnx.jit(lambda: DecoderLM(get_config("llama-tiny", num_layers=1), rngs=nnx.Rngs(0)))
_fwd = nnx.jit(lambda m, t: m(t))
_kernels = nnx.jit(lambda lins, paths: {p: lins[p].effective_kernel() for p in paths},
                   static_argnums=1)  # fmt: skip


@pytest.mark.parametrize("method", sorted(CASES))
def test_decoder_lm_noop_then_merge(method):
    model = _model()
    tokens = np.random.default_rng(0).integers(0, 256, (2, 6)).astype(np.int32)
    base = _fwd(model, tokens)
    cfg = lr.make_method(method, **CASES[method])

    @nnx.jit
    def attach(m):
        pattern = r"attn/(q|o)$|mlp/down$"
        return len(lr.attach(m, pattern, lambda p, lin: cfg.build(p, lin, rngs=nnx.Rngs(1))))

    assert attach(model) == 3
    np.testing.assert_array_equal(np.asarray(_fwd(model, tokens)), np.asarray(base))
    _wake(model)
    adapted = _fwd(model, tokens)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-4
    lins = lr.linear_paths(model)
    paths = tuple(p for p in lins if lins[p].adapter is not None)
    assert len(paths) == 3
    merged_kernels = _kernels(lins, paths)
    lr.detach(model)
    for p, k in merged_kernels.items():
        lins[p].kernel[...] = k
    np.testing.assert_allclose(np.asarray(_fwd(model, tokens)), np.asarray(adapted),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
