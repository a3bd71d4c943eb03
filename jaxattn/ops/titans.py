"""``jaxattn.ops.titans``: the Titans neural long-term memory, updated at test time.

Behrouz, Zhong and Mirrokni 2024, "Titans: Learning to Memorize at Test Time" (arXiv
2501.00663). The memory is a small MLP M whose weights are the state. Each token writes
(k_t, v_t) by one gradient step on the associative loss, with momentum ("surprise") and a
forgetting gate (weight decay); reading is a forward pass of the current weights:

    ℓ(M; k_t, v_t) = ‖M(k_t) − v_t‖²                             (Eq. 12)
    S_t = η_t S_{t-1} − θ_t ∇ℓ(M_{t-1}; k_t, v_t)                 (Eq. 14, surprise)
    M_t = (1 − α_t) M_{t-1} + S_t                                 (Eq. 13, forgetting)
    y_t = M_t(q_t)                                                (Eq. 15, retrieval)

θ_t (learning rate), η_t (momentum) and α_t (forgetting) are per token and head, in [0, 1]
(the layer makes them data dependent). Here y_t reads the weights after token t's write, as
linear attention's output includes its own token.

Chunked-parallel form (§3.2): the sequence is cut into chunks of C tokens and every gradient
in a chunk is taken at the chunk-start weights M_{t'} (t' = t − t mod C), so the C gradients
are one batched (vmapped) computation; the momentum and forgetting recurrences stay per token
and are linear, so each is one matmul with a [C, C] matrix of products of the gates; chunks
follow each other in a ``lax.scan``. C = 1 is exactly the per-token recurrence above
(:func:`titans_memory_step`, the decoding form); C > 1 is the paper's training approximation.

The memory is ``depth`` weight matrices with ``activation`` between them (no biases):
M(x) = act(… act(x W_1) W_2 …) W_L; depth 1 is the linear memory M(k) = k W.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "memory_apply",
    "memory_loss",
    "titans_memory_step",
    "titans_memory",
    "MEMORY_ACTIVATIONS",
]

MEMORY_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def memory_apply(weights, x, activation: str = "silu"):
    """M(x): the memory MLP on x [..., H_in] with weights (W_1 [H_in, H_1], …, W_L [·, H_out])."""
    act = MEMORY_ACTIVATIONS[activation]
    h = x
    for i, w in enumerate(weights):
        if i:
            h = act(h)
        h = h @ w
    return h


def memory_loss(weights, k_H, v_H, activation: str = "silu"):
    """ℓ(M; k, v) = ‖M(k) − v‖² for one token (k [H_in], v [H_out]), summed over features."""
    r = memory_apply(weights, k_H, activation) - v_H
    return jnp.sum(r * r)


def titans_memory_step(weights, momentum, q_H, k_H, v_H, lr, mom, decay, activation="silu"):
    """One token of Eq. 13-15 for one head: write (k, v), then read q.

    Args:
      weights, momentum: the memory M_{t-1} and surprise S_{t-1}, tuples of matrices.
      q_H, k_H: [H_in]; v_H: [H_out]; lr θ_t, mom η_t, decay α_t: scalars.

    Returns:
      (y_t [H_out], M_t, S_t).
    """
    grads = jax.grad(memory_loss)(weights, k_H, v_H, activation)
    momentum = tuple(mom * s - lr * g for s, g in zip(momentum, grads))
    weights = tuple((1.0 - decay) * w + s for w, s in zip(weights, momentum))
    return memory_apply(weights, q_H, activation), weights, momentum


def _decay_matrix(a_C):
    """L[i, j] = Π_{j < l <= i} a_l for j <= i, else 0; and P[i] = Π_{l <= i} a_l.

    Products of a [C, C, C] masked tensor (C is a chunk, small), not exp(cumsum(log a)): a gate
    may be exactly 0 (no momentum), where the log form has no gradient.
    """
    c = a_C.shape[0]
    i, j, l = jnp.ogrid[:c, :c, :c]
    inside = (j < l) & (l <= i)
    l_CC = jnp.prod(jnp.where(inside, a_C[None, None, :], 1.0), axis=-1)
    l_CC = jnp.where(jnp.tril(jnp.ones((c, c), bool)), l_CC, 0.0)
    return l_CC, jnp.cumprod(a_C)


def _linear_scan(a_C, b_CP, x0_P):
    """x_i = a_i x_{i-1} + b_i for i < C from x_{-1} = x0: x = L b + P x0, one matmul."""
    l_CC, p_C = _decay_matrix(a_C)
    x_CP = jnp.einsum("ij,j...->i...", l_CC, b_CP)
    return x_CP + p_C.reshape((-1,) + (1,) * x0_P.ndim) * x0_P[None]


def _chunk(carry, inputs, activation):
    """One chunk of one head: gradients at the chunk-start weights, scans over the tokens."""
    weights, momentum = carry
    q_CH, k_CH, v_CH, lr_C, mom_C, decay_C = inputs
    grad_fn = jax.vmap(jax.grad(memory_loss), in_axes=(None, 0, 0, None))
    grads = grad_fn(weights, k_CH, v_CH, activation)  # each [C, *w.shape], all at M_{t'}
    new_s, new_w = [], []
    for w, s, g in zip(weights, momentum, grads):
        s_C = _linear_scan(mom_C, -lr_C.reshape((-1,) + (1,) * s.ndim) * g, s)  # Eq. 14
        w_C = _linear_scan(1.0 - decay_C, s_C, w)  # Eq. 13
        new_s.append(s_C)
        new_w.append(w_C)
    y_CH = jax.vmap(lambda ws, q: memory_apply(ws, q, activation))(tuple(new_w), q_CH)
    return (tuple(w[-1] for w in new_w), tuple(s[-1] for s in new_s)), y_CH


def _titans_one(weights, momentum, q_TH, k_TH, v_TH, lr_T, mom_T, decay_T, chunk, activation):
    t = q_TH.shape[0]

    def split(x):
        return x.reshape((t // chunk, chunk) + x.shape[1:])

    xs = tuple(split(x) for x in (q_TH, k_TH, v_TH, lr_T, mom_T, decay_T))
    (weights, momentum), y = jax.lax.scan(
        lambda c, x: _chunk(c, x, activation), (weights, momentum), xs
    )
    return y.reshape((t,) + y.shape[2:]), weights, momentum


def titans_memory(
    q_BTNH,
    k_BTNH,
    v_BTNH,
    lr_BTN,
    momentum_BTN,
    decay_BTN,
    weights,
    momentum=None,
    *,
    chunk_size: int = 16,
    activation: str = "silu",
):
    """Titans memory over a sequence, chunked-parallel (Eq. 13-15 with chunk-start gradients).

    Args:
      q_BTNH, k_BTNH: queries and keys [B, T, N, H_in]; v_BTNH: values [B, T, N, H_out].
      lr_BTN, momentum_BTN, decay_BTN: θ_t, η_t, α_t per token and head, [B, T, N].
      weights: the memory M_0, a tuple of [B, N, H_l, H_{l+1}] matrices (the first H_l is
        H_in, the last H_{l+1} is H_out).
      momentum: S_0, same structure as ``weights``; None for zeros.
      chunk_size: C, tokens whose gradients share their chunk-start weights; must divide T.
        1 is the exact per-token recurrence.
      activation: between the memory's matrices, a name in MEMORY_ACTIVATIONS.

    Returns:
      (y_BTNH [B, T, N, H_out] float32, M_T, S_T) with M_T, S_T shaped as ``weights``.
    """
    if q_BTNH.ndim != 4 or k_BTNH.shape != q_BTNH.shape or v_BTNH.shape[:3] != q_BTNH.shape[:3]:
        raise ValueError(
            f"q, k must be [B, T, N, H] and v [B, T, N, H_out]; got {q_BTNH.shape=}, "
            f"{k_BTNH.shape=}, {v_BTNH.shape=}"
        )
    b, t, n, _ = q_BTNH.shape
    for name, g in (("lr", lr_BTN), ("momentum", momentum_BTN), ("decay", decay_BTN)):
        if g.shape != (b, t, n):
            raise ValueError(f"{name} gate must be [B, T, N] = {(b, t, n)}; got {g.shape}")
    if chunk_size < 1 or t % chunk_size:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 and divide T={t}")
    if activation not in MEMORY_ACTIVATIONS:
        raise ValueError(f"activation={activation!r} not in {sorted(MEMORY_ACTIVATIONS)}")
    weights = tuple(jnp.asarray(w, jnp.float32) for w in weights)
    if not weights:
        raise ValueError("weights must hold at least one matrix")
    if weights[0].shape[:2] != (b, n) or weights[0].shape[2] != q_BTNH.shape[3]:
        raise ValueError(f"weights[0] must be [B, N, H_in, ·]; got {weights[0].shape}")
    if weights[-1].shape[3] != v_BTNH.shape[3]:
        raise ValueError(f"weights[-1] must be [B, N, ·, H_out]; got {weights[-1].shape}")
    for a, c in zip(weights[:-1], weights[1:]):
        if a.shape[:2] != c.shape[:2] or a.shape[3] != c.shape[2]:
            raise ValueError(f"weights do not chain: {a.shape} then {c.shape}")
    if momentum is None:
        momentum = tuple(jnp.zeros_like(w) for w in weights)
    momentum = tuple(jnp.asarray(s, jnp.float32) for s in momentum)
    if tuple(s.shape for s in momentum) != tuple(w.shape for w in weights):
        raise ValueError("momentum must have the shapes of weights")

    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    # heads and batch are independent memories: vmap the one-sequence form over N, then B
    per_head = jax.vmap(
        lambda w, s, q, k, v, lr, mo, de: _titans_one(
            w, s, q, k, v, lr, mo, de, chunk_size, activation
        ),
        in_axes=(0, 0, 1, 1, 1, 1, 1, 1),
        out_axes=(1, 0, 0),
    )
    y, w_out, s_out = jax.vmap(per_head)(
        weights,
        momentum,
        f32(q_BTNH),
        f32(k_BTNH),
        f32(v_BTNH),
        f32(lr_BTN),
        f32(momentum_BTN),
        f32(decay_BTN),
    )
    return y, w_out, s_out
