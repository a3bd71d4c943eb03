"""SliceGPT on a whole DecoderLM (``jaxattn.convert.slicegpt``; PAPERS.md §9).

One calibration pass sums ``n nᵀ`` of the normalised inputs n = x / rms(x) of every RMSNorm
(each block's ``attn_norm`` and ``mlp_norm``, and ``final_norm``); its PCA gives the rotation Q
[D, D']. Every norm scale is folded into the Linears that read it, the embedding, attention q / k
/ v / o, MLP gate / up / down and the LM head are rotated, and the model is rebuilt with
``d_model = D'`` (head_dim kept, an untied head: a tied table cannot hold both ``E Q`` and the
final norm's scale). The rebuilt norms carry scale sqrt(D / D') and eps · D / D', so their
output is the paper's ``x / ‖x‖`` over the kept dims, and D' = D is the rotation alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import convert as C
from jaxattn import heads
from models._convert_base import _check_no_adapters, calibration_batches, logits
from models.decoder import DecoderLM

__all__ = ["slicegpt", "normed_covariance"]

_READERS, _WRITERS = ("q", "k", "v"), ("o",)


def normed_covariance(model: DecoderLM, tokens_NT, *, batch_size: int = 8) -> np.ndarray:
    """Σ n nᵀ [D, D] over calibration tokens of every RMSNorm input n = x / rms(x) (one jit)."""
    batches = calibration_batches(tokens_NT, batch_size)
    graphdef, state = nnx.split(model)
    total = _covariance_run(graphdef, float(model.config.norm_eps), state, batches)
    return np.asarray(jax.device_get(total), np.float64)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _covariance_run(graphdef, eps, state, batches):
    """The scan of :func:`normed_covariance`, compiled once per (model structure, shapes)."""
    m = nnx.merge(graphdef, state)
    n_layers = len(m.layers)
    names = [f"blocks.{i}.resid_{w}" for i in range(n_layers) for w in ("pre", "mid")]
    names.append(f"blocks.{n_layers - 1}.resid_post")

    def one(tok_BT):
        _, caps = heads.run_with_hooks(m, tok_BT, [heads.Capture(n) for n in names])
        total = 0.0
        for n in names:
            x = caps[n].astype(jnp.float32)
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
            total = total + C.input_moments(x).xx_DD
        return total

    def body(acc, tok_BT):
        return acc + one(tok_BT), None

    total, _ = jax.lax.scan(body, one(batches[0]), batches[1:])
    return total


def _check(model: DecoderLM, dim) -> None:
    c = model.config
    kinds = {i: c.layer_kind(i) for i in range(c.num_layers) if c.layer_kind(i) != "mha"}
    if kinds:
        raise ValueError(
            f"slicegpt rotates 'mha' layers (q/k/v read the stream, o writes it); layers "
            f"{kinds} are other kinds"
        )
    if c.parameterization != "dense":
        raise ValueError(
            f"slicegpt needs dense kernels, got parameterization={c.parameterization!r}"
        )
    _check_no_adapters(model)
    for i, blk in enumerate(model.layers):
        extra = sorted(set(C.layer_params(blk.attn)) - {*_READERS, *_WRITERS, "q_norm", "k_norm"})
        if extra:
            raise ValueError(
                f"slicegpt: layer {i}'s attention has parameters {extra} it cannot rotate"
            )
    d = c.d_model
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
        raise ValueError(f"dim={dim} must be an int in [1, d_model = {d}]")


def slicegpt(
    model: DecoderLM, tokens_NT, *, dim: int, batch_size: int = 8, probe_NT=None
) -> tuple[DecoderLM, list[dict]]:
    """Rotate the residual stream of ``model`` by the calibration PCA and slice it to ``dim``.

    Args:
      model: a DecoderLM of "mha" layers (Llama / Qwen2 / Mistral), dense, without adapters.
      tokens_NT: calibration tokens [N, T].
      dim: D', the kept stream width, in [1, d_model] (d_model: the rotation alone).
      batch_size: calibration rows per step.
      probe_NT: tokens for the logit comparison (default the first calibration batch).

    Returns:
      (the sliced model, [report]: ``discarded`` eigenvalue share, ``max_abs_logit_diff`` and
      ``relative_logit_error`` (‖Δlogits‖ / ‖logits‖) on the probe, ``parameters``).
    """
    _check(model, dim)
    c, d = model.config, model.config.d_model
    cov = normed_covariance(model, tokens_NT, batch_size=batch_size)
    q, info = C.pca_rotation(cov, dim)
    p = C.layer_params(model)
    new = {"embed": {"table": np.asarray(model.embed.table[...], np.float64) @ q}}
    ones = np.full(dim, np.sqrt(d / dim))  # the norm over D' dims reads as x / ‖x‖ · sqrt(D)
    for i in range(c.num_layers):
        pre = f"layers/{i}"
        g_attn, g_mlp = p[f"{pre}/attn_norm"]["scale"], p[f"{pre}/mlp_norm"]["scale"]
        new[f"{pre}/attn_norm"] = new[f"{pre}/mlp_norm"] = {"scale": ones}
        for name in _READERS:
            new[f"{pre}/attn/{name}"] = C.rotate_reader(p[f"{pre}/attn/{name}"], q, g_attn)
        for name in _WRITERS:
            new[f"{pre}/attn/{name}"] = C.rotate_writer(p[f"{pre}/attn/{name}"], q)
        for name in ("q_norm", "k_norm"):
            if f"{pre}/attn/{name}" in p:
                new[f"{pre}/attn/{name}"] = p[f"{pre}/attn/{name}"]
        for name in ("gate", "up"):
            new[f"{pre}/mlp/{name}"] = C.rotate_reader(p[f"{pre}/mlp/{name}"], q, g_mlp)
        new[f"{pre}/mlp/down"] = C.rotate_writer(p[f"{pre}/mlp/down"], q)
    new["final_norm"] = {"scale": ones}
    new["lm_head"] = C.rotate_reader(p["lm_head"], q, p["final_norm"]["scale"])
    a0 = c.layer_attention_config(0)
    cfg = c.replace(d_model=dim, head_dim=a0.h, norm_eps=c.norm_eps * d / dim, tie_embeddings=False)
    sliced = _build(cfg, new)
    probe_NT = np.asarray(tokens_NT)[:batch_size] if probe_NT is None else np.asarray(probe_NT)
    ref = logits(model, probe_NT).astype(np.float64)
    out = logits(sliced, probe_NT).astype(np.float64)
    count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(sliced, nnx.Param)))
    report = {
        "step": "slicegpt",
        "discarded": info["discarded"],
        "max_abs_logit_diff": float(np.abs(out - ref).max()),
        "relative_logit_error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "parameters": float(count),
    }
    return sliced, [report]


def _build(cfg, params: dict) -> DecoderLM:
    """A DecoderLM of ``cfg`` holding ``params`` ({module path: {leaf: array}})."""
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    values = []
    for path, var in nnx.to_flat_state(state):
        value = np.asarray(params["/".join(map(str, path[:-1]))][path[-1]])
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{path}: sliced shape {value.shape}, expected {var.shape}")
        values.append((path, var.replace(jnp.asarray(np.asarray(value, var.dtype)))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))
