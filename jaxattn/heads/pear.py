"""PEAR: Position-Embedding-Agnostic Attention Re-weighting (Tan et al. 2024), on the hooks.

On a context-copying proxy task PEAR (1) finds the heads that *suppress* context use: masking
head h lowers the proxy loss, ``score_h = loss(model) - loss(model with h masked) > 0``;
(2) multiplies those heads' outputs by coefficients ``c_h`` trained with the model frozen to
minimise the proxy loss; (3) folds the fixed coefficients into the output projection,
``W_O'[h] = c_h · W_O[h]``, so inference costs nothing extra. Nothing depends on the position
embedding: the coefficients act on per-head outputs ``attn.z`` after attention.

The scaling point is ``blocks.<i>.attn.z`` ([B, T, N, V], what ``out`` reads), so
``o(z · c) = sum_h c_h z_h W_O[h] + b`` = ``o'(z)`` with the folded kernel and the same bias.

Functions
  coefficient_hooks(coeffs_LN)                    scale_heads on every layer's attn.z
  suppression_scores(loss_fn, L, N)              per-head loss(model) - loss(masked h)
  train_coefficients(loss_fn, heads, L, N, ...)  Adam on the chosen heads' c_h only
  fold_coefficients(model, coeffs_LN)            a copy with W_O[h] scaled (exact)
where ``loss_fn(hooks) -> scalar`` runs the frozen model on the proxy batch with ``hooks``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.heads._hooks import scale_heads

__all__ = [
    "coefficient_hooks",
    "suppression_scores",
    "train_coefficients",
    "fold_coefficients",
]


def coefficient_hooks(coeffs_LN) -> list:
    """``scale_heads`` on ``blocks.<i>.attn.z`` by row i of ``coeffs_LN`` [L, N] (traced ok)."""
    coeffs_LN = jnp.asarray(coeffs_LN)
    if coeffs_LN.ndim != 2:
        raise ValueError(f"coeffs_LN must be [layers, heads], got shape {coeffs_LN.shape}")
    return [scale_heads(f"blocks.{i}.attn.z", coeffs_LN[i]) for i in range(coeffs_LN.shape[0])]


def suppression_scores(loss_fn: Callable, num_layers: int, num_heads: int) -> np.ndarray:
    """PEAR's detection: ``loss(model) - loss(model with head h's z zeroed)`` per head.

    Positive: masking the head lowers the proxy loss (it suppresses copying from context).

    Args:
      loss_fn: ``hooks -> scalar`` proxy loss of the frozen model (traceable: it is jitted with
        the head scales as arguments; a masked head is a scale of 0 on its ``attn.z``).

    Returns:
      float64 numpy [L, N].
    """
    # one compiled program: masking = a traced scale of 0 (scale_heads), not a new hook set
    run = jax.jit(lambda c_LN: loss_fn(coefficient_hooks(c_LN)))
    ones = jnp.ones((num_layers, num_heads), jnp.float32)
    base = float(run(ones))
    out = np.zeros((num_layers, num_heads))
    for i in range(num_layers):
        for n in range(num_heads):
            out[i, n] = base - float(run(ones.at[i, n].set(0.0)))
    return out


def train_coefficients(
    loss_fn: Callable,
    heads: Sequence[tuple[int, int]],
    num_layers: int,
    num_heads: int,
    *,
    steps: int = 100,
    learning_rate: float = 0.05,
):
    """Learn ``c_h`` for ``heads`` (others fixed at 1) with Adam, the model frozen.

    The gradient is taken with respect to the coefficients only: they are the sole trainable
    parameters. Starts from ``c = 1`` (the base model).

    Args:
      loss_fn: ``hooks -> scalar`` proxy loss (differentiable in the hooks' scales).
      heads: (layer, head) pairs to re-weight.

    Returns:
      (coeffs_LN float32 [L, N], losses float numpy [steps + 1]: before each step and at end).
    """
    import optax

    if not heads:
        raise ValueError("heads is empty: choose the heads to re-weight")
    sel = np.zeros((num_layers, num_heads), bool)
    for layer, head in heads:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(f"head {(layer, head)} is out of range for {num_layers}x{num_heads}")
        sel[layer, head] = True
    sel_LN = jnp.asarray(sel)

    def coeffs(free_LN):
        return jnp.where(sel_LN, free_LN, 1.0)

    def loss(free_LN):
        return loss_fn(coefficient_hooks(coeffs(free_LN)))

    opt = optax.adam(learning_rate)

    @jax.jit
    def step(free_LN, state):
        value, grad = jax.value_and_grad(loss)(free_LN)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(free_LN, updates), state, value

    free = jnp.ones((num_layers, num_heads), jnp.float32)
    state = opt.init(free)
    losses = []
    for _ in range(steps):
        free, state, value = step(free, state)
        losses.append(float(value))
    losses.append(float(jax.jit(loss)(free)))
    return coeffs(free), np.asarray(losses)


def fold_coefficients(model, coeffs_LN):
    """A copy of ``model`` whose layer i output projection kernel is ``c[i, h] · W_O[h]``.

    Exact: ``o(z · c) = o'(z)`` (the bias is not per head and stays). The model itself is not
    changed.

    Raises:
      ValueError: a coefficient shape that does not match layers x heads, or an output
        projection with an adapter or a factorised kernel (fold those first).
    """
    coeffs_LN = jnp.asarray(coeffs_LN, jnp.float32)
    layers = getattr(model, "layers", None)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no `layers`")
    folded = nnx.clone(model)
    if coeffs_LN.shape[0] != len(layers):
        raise ValueError(f"coeffs_LN has {coeffs_LN.shape[0]} rows for {len(layers)} layers")
    for i, block in enumerate(folded.layers):
        o = block.attn.o
        n = o.in_shape[0]
        if coeffs_LN.shape[1] != n:
            raise ValueError(f"coeffs_LN has {coeffs_LN.shape[1]} heads; layer {i} has {n}")
        if o.adapter is not None or o.form is not None or o.transposed:
            raise ValueError(f"layer {i}: attn.o has an adapter or factorised kernel; merge it")
        w = o.kernel[...]
        scale = coeffs_LN[i].reshape((n,) + (1,) * (w.ndim - 1)).astype(w.dtype)
        o.kernel.set_value(w * scale)
    return folded
