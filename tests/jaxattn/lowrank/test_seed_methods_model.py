"""Hydra, NOLA, RandLoRA, DyLoRA, SoRA, LoRA-SB, IncreLoRA, LoRAPrune and MoLoRA (one LoRA) on a
tiny DecoderLM (Hydra under jit, the rest eagerly, to keep compiles few; DyLoRA has its own jit
train step): a no-op at attach, and after their zero-initialized factor is set, the merged model
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
    keys = jax.random.split(jax.random.key(11), len(leaves))
    new = [0.05 * jax.random.normal(k, v.shape, v.dtype) + v for k, v in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(tree, new))


@pytest.mark.parametrize("method", sorted(CASES))
def test_decoder_lm_noop_then_merge(method):
    model = DecoderLM(get_config("llama-tiny", num_layers=1), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 256)
    fwd = (lambda m, t: m(t)) if method != "hydra" else nnx.jit(lambda m, t: m(t))
    base = fwd(model, tokens)
    cfg = lr.make_method(method, **CASES[method])
    paths = lr.attach(model, r"attn/(q|o)$|mlp/down$",
                      lambda p, lin: cfg.build(p, lin, rngs=nnx.Rngs(1)))  # fmt: skip
    assert len(paths) == 3
    np.testing.assert_array_equal(np.asarray(fwd(model, tokens)), np.asarray(base))
    _wake(model)
    adapted = fwd(model, tokens)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-4
    lins = lr.linear_paths(model)
    merged_kernels = {p: lins[p].effective_kernel() for p in paths}
    lr.detach(model)
    for p, k in merged_kernels.items():
        lins[p].kernel[...] = k
    np.testing.assert_allclose(np.asarray(fwd(model, tokens)), np.asarray(adapted),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
