"""Talking Heads (Merullo et al. 2024): low-rank residual subspaces that one head writes and a
later head reads, from the SVD of the heads' weight products.

Row-vector convention (``x_D @ W``): a head's OV product ``W_OV = W_V[h] @ W_O[h]`` [D, D]
writes into the span of the top right-singular vectors of ``W_OV``; its QK product
``W_QK = W_Q[h] @ W_K[h]^T`` [D, D] reads the query through the top left-singular vectors
and the key through the top right-singular ones. The composition score of a write subspace
``A`` (r_a orthonormal rows) and a read subspace ``B`` (r_b rows) is
``||B A^T||_F^2 / min(r_a, r_b)`` in [0, 1]: 1 when one contains the other, ~r/D at random.
An edit along a subspace ``U`` scales the residual's projection on it and leaves the
orthogonal complement exactly unchanged.

Weights are read through ``Linear.effective_kernel()`` (adapters folded in); kinds whose layer
has ``q``, ``k``, ``v``, ``o`` Linears with per-head axes (MHA / GQA) are supported.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["head_ov", "head_qk", "subspaces", "composition_score", "edit_subspace"]


def _attn(model, layer: int):
    layers = getattr(model, "layers", None)
    if not layers or not 0 <= layer < len(layers):
        raise ValueError(f"layer={layer} is out of range for {len(layers or ())} layers")
    attn = layers[layer].attn
    if not all(hasattr(attn, n) for n in "qkvo"):
        raise ValueError(f"layer {layer} ({type(attn).__name__}) has no q / k / v / o projections")
    return attn


def _head(attn, head: int):
    n = attn.q.out_shape[0]
    if not 0 <= head < n:
        raise ValueError(f"head={head} is out of range for {n} heads")
    return head // (n // attn.k.out_shape[0])  # its kv head (GQA)


def head_ov(model, layer: int, head: int):
    """``W_V[kv(h)] @ W_O[h]``: [D, D] float32."""
    attn = _attn(model, layer)
    g = _head(attn, head)
    v_DV = attn.v.effective_kernel(jnp.float32)[:, g]
    o_VD = attn.o.effective_kernel(jnp.float32)[head]
    return v_DV @ o_VD


def head_qk(model, layer: int, head: int):
    """``W_Q[h] @ W_K[kv(h)]^T``: [D, D] float32 (before RoPE and the softmax scale)."""
    attn = _attn(model, layer)
    g = _head(attn, head)
    return (
        attn.q.effective_kernel(jnp.float32)[:, head] @ attn.k.effective_kernel(jnp.float32)[:, g].T
    )


def subspaces(w_DD, rank: int):
    """(left rows [r, D], singular values [r], right rows [r, D]) of the top-``rank`` SVD."""
    if not 1 <= rank <= min(w_DD.shape):
        raise ValueError(f"rank={rank} must be in [1, {min(w_DD.shape)}]")
    u, s, vt = jnp.linalg.svd(jnp.asarray(w_DD, jnp.float32), full_matrices=False)
    return u[:, :rank].T, s[:rank], vt[:rank]


def composition_score(write_rD, read_rD) -> float:
    """``||B A^T||_F^2 / min(r_a, r_b)`` of orthonormal row sets A (write) and B (read)."""
    a, b = jnp.asarray(write_rD), jnp.asarray(read_rD)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"write_rD {a.shape} and read_rD {b.shape} must be [r, D] with one D")
    return float(jnp.sum((b @ a.T) ** 2) / min(a.shape[0], b.shape[0]))


def edit_subspace(x_BTD, u_rD, scale: float):
    """``x + (scale - 1) · (x U^T) U``: the projection on span(U) times ``scale``, the rest
    unchanged (U orthonormal rows)."""
    u = jnp.asarray(u_rD, jnp.float32)
    coef = jnp.einsum("...d,rd->...r", x_BTD.astype(jnp.float32), u)
    return (x_BTD + (scale - 1.0) * jnp.einsum("...r,rd->...d", coef, u)).astype(x_BTD.dtype)
