"""Shared helpers of the hook tests: tiny models of each kind and an explicit softmax reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import DecoderLM, get_config

# "mha": GQA (G = 2), a sliding window on layer 1, a soft cap; "mla": DeepSeek MLA
CONFIGS = {
    "mha": lambda **kw: get_config(
        "llama-tiny", sliding_window=3, sliding_window_layers=(1,), logits_soft_cap=5.0, **kw
    ),
    "mla": lambda **kw: get_config("deepseek-tiny", **kw),
}


def model_of(kind: str, seed: int = 0, **kw) -> DecoderLM:
    return DecoderLM(CONFIGS[kind](**kw), rngs=nnx.Rngs(seed))


def tokens(b: int = 2, t: int = 8, seed: int = 1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 256)


def packed():
    """Two rows, row 0 packing segments of 3 and 5 tokens (positions restart)."""
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8])
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))])
    return dict(segment_ids_BT=seg, positions_BT=pos)


def visible_BTS(t: int, *, window=None, segment_ids_BT=None, batch=2):
    """The explicit bool mask [B, T, S]: causal, optional window, same segment."""
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    vis = np.broadcast_to(j <= i, (batch, t, t)).copy()
    if window is not None:
        vis &= (i - j < window)[None]
    if segment_ids_BT is not None:
        seg = np.asarray(segment_ids_BT)
        vis &= seg[:, :, None] == seg[:, None, :]
    return vis


def reference_probs(q_BTNH, k_BSKH, vis_BTS, *, scale, soft_cap=None):
    """(masked logits, probabilities) [B, N, T, S]: the logits in fp64 numpy, then
    ``jax.nn.softmax`` of the explicitly masked logits (fully masked rows set to 0)."""
    q, k = np.asarray(q_BTNH, np.float64), np.asarray(k_BSKH, np.float64)
    g = q.shape[2] // k.shape[2]
    k = np.repeat(k, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if soft_cap is not None:
        s = soft_cap * np.tanh(s / soft_cap)
    s = np.where(vis_BTS[:, None], s, -np.inf)
    p = np.asarray(jax.nn.softmax(jnp.asarray(s, jnp.float32), axis=-1))
    return s, np.nan_to_num(p, nan=0.0)


def run(model, toks, hooks, **kw):
    """``heads.run_with_hooks`` under ``jax.jit`` (the model's arrays passed as arguments)."""
    graphdef, state = nnx.split(model)
    return _jitted_run(graphdef, tuple(hooks))(state, toks, kw)


def forward(model, toks, **kw):
    """The plain forward under ``jax.jit`` (compiled once per model structure)."""
    graphdef, state = nnx.split(model)
    return _jitted_forward(graphdef)(state, toks, kw)


@functools.cache
def _jitted_run(graphdef, hooks):
    from jaxattn import heads

    return jax.jit(lambda s, t, kw: heads.run_with_hooks(nnx.merge(graphdef, s), t, hooks, **kw))


@functools.cache
def _jitted_forward(graphdef):
    return jax.jit(lambda s, t, kw: nnx.merge(graphdef, s)(t, **kw))
