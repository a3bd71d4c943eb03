"""Model-level machinery of the conversions: calibration passes, rebuilt models, perplexity.

``calibrate`` gathers per-layer statistics in one compiled pass: the blocks' inputs are captured
through the ``jaxattn.heads`` hooks at ``blocks.<i>.resid_pre``, normed by the block's own
``attn_norm`` and reduced to sums inside ``jax.lax.scan``. ``rebuild`` makes a DecoderLM of a
new config from an old model's weights and new attention-layer params; ``with_layers`` writes
per-layer attention configs into a ModelConfig as layer specs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import convert as C
from jaxattn import heads
from jaxattn.layers import AdapterParam, Linear, MLAConfig
from models.config import LayerSpec, ModelConfig
from models.decoder import DecoderLM

__all__ = ["calibrate", "rebuild", "with_layers", "perplexity", "logits"]


# -- calibration --------------------------------------------------------------------------------
def calibration_batches(tokens_NT, batch_size: int) -> jax.Array:
    """Calibration tokens [N, T] as [N // batch_size, batch_size, T] (whole batches; the rest of
    the rows dropped), for one compiled scan over them."""
    tokens_NT = np.asarray(tokens_NT)
    if tokens_NT.ndim != 2 or tokens_NT.shape[0] < batch_size:
        raise ValueError(
            f"calibration tokens must be [rows >= batch_size={batch_size}, T], "
            f"got shape {tokens_NT.shape}"
        )
    nb = tokens_NT.shape[0] // batch_size
    return jnp.asarray(tokens_NT[: nb * batch_size].reshape(nb, batch_size, -1))


def calibrate(model: DecoderLM, tokens_NT, stat_fn: Callable, *, batch_size: int = 8) -> list:
    """Per-layer sums of ``stat_fn(attn_layer, x_BTD)`` over calibration rows, in one jit.

    Args:
      model: the DecoderLM.
      tokens_NT: int tokens [N, T] (N rows of T tokens); rows past a multiple of batch_size
        are not used.
      stat_fn: ``(attention layer, its input x [B, T, D]) -> pytree of sums`` (e.g.
        ``lambda attn, x: jaxattn.convert.input_moments(x)``); summed over batches with ``+``.
      batch_size: rows per step of the scan.

    Returns:
      [stats of layer i], host values.
    """
    batches = calibration_batches(tokens_NT, batch_size)
    graphdef, state = nnx.split(model)
    return jax.device_get(_calibrate_run(graphdef, stat_fn, state, batches))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _calibrate_run(graphdef, stat_fn, state, batches):
    """The scan of :func:`calibrate`, compiled once per (model structure, stat_fn, shapes)."""
    m = nnx.merge(graphdef, state)
    names = [f"blocks.{i}.resid_pre" for i in range(len(m.layers))]

    def one(tok_BT):
        _, caps = heads.run_with_hooks(m, tok_BT, [heads.Capture(n) for n in names])
        return [
            stat_fn(blk.attn, blk.attn_norm(caps[n]))
            for blk, n in zip(m.layers, names, strict=True)
        ]

    def body(acc, tok_BT):
        return [a + b for a, b in zip(acc, one(tok_BT), strict=True)], None

    total, _ = jax.lax.scan(body, one(batches[0]), batches[1:])
    return total


def _input_moments(attn, x):
    return C.input_moments(x)


def _latent_norm_stats(attn, x):
    c = attn.config
    return C.latent_norm_stats(attn.kv_a(x)[..., : c.kv_lora_rank], c.latent_norm_eps)


# module-level stat functions: calibrate's compiled scan is cached on their identity
def _moments(model, tokens_NT, batch_size):
    return calibrate(model, tokens_NT, _input_moments, batch_size=batch_size)


def _norm_stats(model, tokens_NT, batch_size):
    return calibrate(model, tokens_NT, _latent_norm_stats, batch_size=batch_size)


# -- rebuilding ---------------------------------------------------------------------------------
def _check_no_adapters(model: DecoderLM) -> None:
    adapted = [
        "/".join(map(str, p))
        for p, m in nnx.iter_modules(model)
        if isinstance(m, Linear) and m.adapter is not None
    ]
    if adapted:
        raise ValueError(
            f"merge the adapters on {adapted} first (jaxattn.lowrank.merge): a conversion "
            "rewrites the base weights"
        )


def with_layers(cfg: ModelConfig, layers: list) -> ModelConfig:
    """``cfg`` whose layer i is the attention config ``layers[i]``: per-layer specs hold the
    fields where a layer differs from what its kind's ``from_model`` gives (none: no specs)."""
    cfg = cfg.replace(layer_specs=None, layer_pattern=None)
    specs = []
    for i, a in enumerate(layers):
        default = type(a).from_model(cfg, i)
        diff = {
            f.name: getattr(a, f.name)
            for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(default, f.name)
        }
        specs.append(LayerSpec.of(a.kind, **diff))
    if any(s.overrides for s in specs) or any(a.kind != cfg.attention for a in layers):
        cfg = cfg.replace(layer_specs=tuple(specs))
    return cfg


def _mla_model_config(base: ModelConfig, layers: list[MLAConfig]) -> ModelConfig:
    """``base`` with MLA layers ``layers``: model-level fields from layer 0, the rest as specs."""
    a0 = layers[0]
    cfg = base.replace(
        arch="deepseek_v3",
        attention="mla",
        num_kv_heads=None,
        head_dim=None,
        num_query_heads=None,
        qkv_bias=False,
        o_bias=False,
        qk_norm=False,
        logits_soft_cap=None,
        sliding_window=None,
        sliding_window_layers=None,
        layer_specs=None,
        layer_pattern=None,
        cache=None,
        q_lora_rank=a0.q_lora_rank,
        # the model-level latent is bounded by d_model (MLAConfig.from_model); a wider one (the
        # rope step of an MHA source: K·(H+V) - P > D) is every layer's own spec override
        kv_lora_rank=min(a0.kv_lora_rank, base.d_model),
        qk_nope_head_dim=a0.qk_nope_head_dim,
        qk_rope_head_dim=a0.qk_rope_head_dim,
        v_head_dim=a0.v_head_dim,
        rope=a0.rope,
        latent_norm_eps=a0.latent_norm_eps,
    )
    return with_layers(cfg, layers)


def rebuild(model: DecoderLM, config: ModelConfig, layer_params: list[dict]) -> DecoderLM:
    """A DecoderLM of ``config`` with ``model``'s weights and new attention layers.

    Embeddings, norms, MLPs and the head are copied from ``model``; layer i's attention takes
    ``layer_params[i]`` (nested dicts as ``jaxattn.convert.layer_params`` gives them).
    """
    _check_no_adapters(model)
    cfg = config
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    old = {
        p: v
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if not isinstance(v, AdapterParam)
    }
    values = []
    for path, var in nnx.to_flat_state(state):
        if path[0] == "layers" and path[2] == "attn":
            entry = layer_params[path[1]]["/".join(map(str, path[3:-1]))][path[-1]]
            value = np.asarray(entry)
        else:
            value = old[path][...]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{path}: converted shape {value.shape}, expected {var.shape}")
        values.append((path, var.replace(jnp.asarray(np.asarray(value, var.dtype)))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


# -- evaluation ---------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens_BT):
    return nnx.merge(graphdef, state)(tokens_BT)


def logits(model: DecoderLM, tokens_BT) -> np.ndarray:
    """``model(tokens_BT)`` as a host array, compiled once per graph structure (the reports'
    logit comparisons: an eager forward compiles every op of the model separately)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_apply(graphdef, state, jnp.asarray(tokens_BT)))


def perplexity(model: DecoderLM, tokens_N, *, seq_len: int = 128, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over consecutive windows of ``seq_len + 1`` tokens."""
    tokens_N = np.asarray(tokens_N).reshape(-1)
    n = (len(tokens_N) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens_N)} eval tokens: fewer than seq_len + 1 = {seq_len + 1}")
    rows = tokens_N[: n * seq_len + 1]
    x_NT = np.stack([rows[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, w_BT):
        logits = nnx.merge(graphdef, state)(w_BT[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # fp32 log-softmax
        return -jnp.take_along_axis(logp, w_BT[:, 1:, None], axis=-1).sum()

    total = 0.0
    for i in range(0, n, batch_size):
        total += float(nll(state, jnp.asarray(x_NT[i : i + batch_size])))
    return float(np.exp(total / (n * seq_len)))
