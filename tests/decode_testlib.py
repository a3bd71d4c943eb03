"""Shared test helper: a model's cached decode, prefill then one token per step."""

import jax
import jax.numpy as jnp
from flax import nnx


@nnx.jit
def decode_all(model, tokens):
    """Prefill 4 tokens, then one token per step (a lax.scan): logits [B, T, V]."""
    cache = model.init_cache(tokens.shape[0], 16, jnp.float32)
    first, cache = model.decode(tokens[:, :4], cache)

    def step(cache, tok_B):
        logits, cache = model.decode(tok_B[:, None], cache)
        return cache, logits[:, 0]

    _, rest = jax.lax.scan(step, cache, tokens[:, 4:].T)
    return jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], 1)
