"""``jaxattn.ops.linear_attention``: causal linear attention with gates, decays and the delta rule.

Katharopoulos et al. 2020 ("Transformers are RNNs", eq. 2-4): replacing softmax(q·k) by
φ(q)·φ(k) lets the causal sum be carried as a state S_t = Σ_{s≤t} φ(k_s) v_sᵀ, so
o_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t (z_t = Σ_{s≤t} φ(k_s); the division is ``normalize``).
The variants of flash-linear-attention (whose naive torch references the tests compare with)
add a per-step decay of the state or the delta rule, with G_t = Σ_{s≤t} g_t:

=================  ==============================================  =====================
variant            state update                                    log_decay g / beta
=================  ==============================================  =====================
linear_attn        S_t = S_{t-1} + k_t v_tᵀ                        none / none
retention          S_t = γ S_{t-1} + k_t v_tᵀ  (RetNet)            [K] log γ / none
simple_gla         S_t = exp(g_t) S_{t-1} + k_t v_tᵀ               [B, T, K] / none
gla                S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ          [B, T, K, H] / none
delta_rule         S_t = S_{t-1} + k_t β_t (v_t - S_{t-1}ᵀk_t)ᵀ    none / [B, T, K]
gated_delta_rule   S' = exp(g_t) S_{t-1}; S_t = S' + k_t β_t       [B, T, K] / [B, T, K]
                   (v_t - S'ᵀk_t)ᵀ
=================  ==============================================  =====================

and o_t = scale · S_tᵀ φ(q_t). The state lives at the kv heads (K of them, each read by the
G = N / K query heads of its group) and is [B, K, H, V] float32 (V + 1 with ``normalize``:
z rides as an extra value column of ones). Three implementations agree: ``"naive"`` (the
O(T²) masked form), ``"chunked"`` (dense within chunks, the state carried between them by
``lax.scan``; custom VJP that keeps only chunk-boundary states and recomputes each chunk) and
``"recurrent"`` (one step per token; with T = 1 and ``initial_state`` it is the decode step).
All compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from jaxattn.ops._linear_attention_forms import chunked_form, naive_form, recurrent_form
from jaxattn.ops.nala import nala_key_map, nala_query_map

__all__ = [
    "linear_attention",
    "LINEAR_VARIANTS",
    "LINEAR_IMPLEMENTATIONS",
    "FEATURE_MAPS",
    "retention_log_decay",
    "resolve_feature_map",
    "feature_dim",
]

LINEAR_VARIANTS = (
    "linear_attn",
    "retention",
    "simple_gla",
    "gla",
    "delta_rule",
    "gated_delta_rule",
)
LINEAR_IMPLEMENTATIONS = ("chunked", "naive", "recurrent")
FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu+1": lambda x: jax.nn.elu(x) + 1,  # Katharopoulos et al. 2020, eq. 7
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    # NaLaFormer (jaxattn.ops.nala): a (φ_q, φ_k) pair, H -> 2H features
    "nala": (nala_query_map, nala_key_map),
}
_DELTA = ("delta_rule", "gated_delta_rule")
# which variants take which gate: (log_decay rank without batch/time, beta?)
_GATES = {
    "linear_attn": (None, False),
    "retention": ("per_head", False),
    "simple_gla": ("scalar", False),
    "gla": ("per_dim", False),
    "delta_rule": (None, True),
    "gated_delta_rule": ("scalar", True),
}
_EPS = 1e-10  # normaliser epsilon, as flash-linear-attention's


def retention_log_decay(num_heads: int) -> jax.Array:
    """RetNet's fixed per-head decays, log γ_h = log(1 - 2^(-5-h)), float32 [num_heads]."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


def resolve_feature_map(feature_map):
    """(φ_q, φ_k) from None (identity), a name in FEATURE_MAPS, a callable (the same φ on q
    and k) or a pair of callables; raises ValueError naming ``feature_map`` otherwise."""
    if feature_map is None:
        feature_map = "identity"
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map={feature_map!r} must be a callable, a (φ_q, φ_k) pair or one "
                f"of {sorted(FEATURE_MAPS)}"
            )
        feature_map = FEATURE_MAPS[feature_map]
    if callable(feature_map):
        return feature_map, feature_map
    if isinstance(feature_map, tuple) and len(feature_map) == 2 and all(map(callable, feature_map)):
        return feature_map
    raise ValueError(
        f"feature_map={feature_map!r} must be a callable, a (φ_q, φ_k) pair or one of "
        f"{sorted(FEATURE_MAPS)}"
    )


def feature_dim(feature_map, head_dim: int) -> int:
    """The width φ maps H to (the state's key dim): 2H for "nala", H for the others."""
    _, phi_k = resolve_feature_map(feature_map)
    shape = jax.eval_shape(phi_k, jax.ShapeDtypeStruct((head_dim,), jnp.float32)).shape
    return shape[-1]


def _check(q, k, v, variant, log_decay, beta, scale, normalize, initial_state, impl, chunk):
    if variant not in LINEAR_VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {LINEAR_VARIANTS}")
    if impl not in LINEAR_IMPLEMENTATIONS:
        raise ValueError(f"implementation={impl!r} must be one of {LINEAR_IMPLEMENTATIONS}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk_size={chunk!r} must be a positive int")
    for name, x in (("q_BTNH", q), ("k_BTKH", k), ("v_BTKV", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, length, heads, dim], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating, got {x.dtype}")
    b, t, n, h = q.shape
    if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3] or k.shape[3] != h:
        raise ValueError(
            f"q_BTNH {q.shape}, k_BTKH {k.shape} and v_BTKV {v.shape} must share batch and "
            "length, k must have q's head dim H, and v k's heads K"
        )
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"kv heads K={kh} (k_BTKH {k.shape}) must divide query heads N={n}")
    gate, wants_beta = _GATES[variant]
    expected = {
        None: None,
        "per_head": (kh,),
        "scalar": (b, t, kh),
        "per_dim": (b, t, kh, h),
    }[gate]
    if gate is None and log_decay is not None:
        raise ValueError(f"variant={variant!r} takes no log_decay (got shape {log_decay.shape})")
    if gate in ("scalar", "per_dim") and log_decay is None:
        raise ValueError(f"variant={variant!r} needs log_decay of shape {expected}")
    if log_decay is not None and log_decay.shape != expected:
        raise ValueError(
            f"log_decay must be {expected} for variant={variant!r} with k_BTKH {k.shape}, "
            f"got {log_decay.shape}"
        )
    if wants_beta != (beta is not None):
        need = f"needs beta of shape {(b, t, kh)}" if wants_beta else "takes no beta"
        raise ValueError(f"variant={variant!r} {need}")
    if beta is not None and beta.shape != (b, t, kh):
        raise ValueError(f"beta must be {(b, t, kh)} (k_BTKH {k.shape}), got {beta.shape}")
    if normalize and variant in _DELTA:
        raise ValueError(f"normalize=True is not defined for variant={variant!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 0
    ):
        raise ValueError(f"scale={scale!r} must be a positive real number")


def _check_features(q, k, v, variant, head_dim, normalize, initial_state):
    """After φ: q and k share the feature width F, and the state is [B, K, F, V (+1)]."""
    b, _, kh, f = k.shape
    if q.shape[-1] != f:
        raise ValueError(f"feature_map maps q to width {q.shape[-1]} and k to {f}: they must agree")
    if variant == "gla" and f != head_dim:
        raise ValueError(
            f"variant='gla' decays per key dim H={head_dim}: its feature_map must keep the "
            f"width, got F={f}"
        )
    vv = v.shape[3] + (1 if normalize else 0)
    if initial_state is not None and initial_state.shape != (b, kh, f, vv):
        raise ValueError(
            f"initial_state must be [B, K, H, V{' + 1' if normalize else ''}] = "
            f"{(b, kh, f, vv)} (H: the feature width), got {initial_state.shape}"
        )


def linear_attention(
    q_BTNH,
    k_BTKH,
    v_BTKV,
    *,
    variant: str = "linear_attn",
    log_decay=None,
    beta=None,
    feature_map=None,
    scale: float | None = None,
    normalize: bool = False,
    initial_state=None,
    return_state: bool = False,
    implementation: str = "chunked",
    chunk_size: int = 64,
):
    """Causal linear attention (see the module docstring for the variants' recurrences).

    Args:
      q_BTNH: queries [B, T, N, H]; k_BTKH: keys [B, T, K, H]; v_BTKV: values [B, T, K, V];
        N % K == 0 (query head n reads kv head n // (N / K)). Any float dtype.
      variant: one of LINEAR_VARIANTS.
      log_decay: the log of the state's decay (≤ 0 for a decay), at the kv heads: retention
        [K] (default ``retention_log_decay(K)``), simple_gla / gated_delta_rule [B, T, K],
        gla [B, T, K, H]; None for linear_attn and delta_rule.
      beta: delta-rule write strengths [B, T, K] (usually in (0, 1)); delta variants only.
      feature_map: φ applied to q and k: a callable, a (φ_q, φ_k) pair or one of
        FEATURE_MAPS (None: identity). φ may change the width H to F (the state's key dim;
        2H for "nala"); ``scale`` still defaults to 1/sqrt(H).
      scale: output scale (default 1/sqrt(H)), a positive concrete real number.
      normalize: divide by scale·φ(q_t)·z_t + 1e-10 (not for the delta variants).
      initial_state: [B, K, F, V (+1 with normalize)] state before step 0 (default zeros;
        F = H unless φ changes the width).
      return_state: also return the state after the last step.
      implementation: "chunked" (training, prefill), "naive" (reference), "recurrent"
        (decoding).
      chunk_size: steps per chunk of "chunked" (> 0; T is padded to a multiple internally).

    Returns:
      o_BTNV in q's dtype, and the final state float32 [B, K, H, V (+1)] if ``return_state``.

    Raises:
      ValueError: bad input, naming the argument and the shapes.
    """
    q, k, v = (jnp.asarray(x) for x in (q_BTNH, k_BTKH, v_BTKV))
    log_decay = None if log_decay is None else jnp.asarray(log_decay)
    beta = None if beta is None else jnp.asarray(beta)
    state = None if initial_state is None else jnp.asarray(initial_state)
    _check(q, k, v, variant, log_decay, beta, scale, normalize, state, implementation, chunk_size)
    phi_q, phi_k = resolve_feature_map(feature_map)
    dtype = q.dtype
    b, t, n, h = q.shape
    kh, vd = k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    q, k = phi_q(q), phi_k(k)
    _check_features(q, k, v, variant, h, normalize, state)
    h = k.shape[3]  # the feature width F (2H for "nala")
    if normalize:  # z_t rides as one more value column of ones
        v = jnp.concatenate([v, jnp.ones((b, t, kh, 1), v.dtype)], axis=-1)
    if variant == "retention":
        log_decay = retention_log_decay(kh) if log_decay is None else log_decay
        g = jnp.broadcast_to(log_decay.astype(jnp.float32)[None, None, :, None], (b, t, kh, 1))
    elif log_decay is None:
        g = jnp.zeros((b, t, kh, 1), jnp.float32)
    else:
        g = log_decay.astype(jnp.float32).reshape(b, t, kh, -1)
    beta = jnp.zeros((b, t, kh), jnp.float32) if beta is None else beta.astype(jnp.float32)
    if state is None:
        state = jnp.zeros((b, kh, h, v.shape[-1]), jnp.float32)
    q = q.reshape(b, t, kh, n // kh, h)
    kw = dict(scale=scale, delta=variant in _DELTA)
    if implementation == "chunked":
        o, state = chunked_form(q, k, v, g, beta, state, chunk_size=chunk_size, **kw)
    elif implementation == "naive":
        o, state = naive_form(q, k, v, g, beta, state, **kw)
    else:
        o, state = recurrent_form(q, k, v, g, beta, state, **kw)
    o = o.reshape(b, t, n, v.shape[-1])
    if normalize:
        o = o[..., :vd] / (o[..., vd:] + _EPS)
    o = o.astype(dtype)
    return (o, state) if return_state else o
