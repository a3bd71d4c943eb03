"""Sparse Spectral Training: train a sampled subset of singular vectors, all singular values.

Zhao et al., "Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural
Networks" (2024). A weight in spectral form ``W = U_mk diag(s_k) Vᵀ_kn`` (the ``sst`` kernel of
``jaxattn.layers``: sibling leaves ``u``, ``s``, ``vt``) is trained so that

* every step updates **all** of ``s``, clamped at 0 after the update (the paper's
  ``Σ ← max(Σ − η∇Σ, 0)``; ``clamp_s``);
* only ``r`` of the ``k`` singular-vector pairs (columns of ``U``, rows of ``Vᵀ``) are updated,
  chosen by multinomial sampling without replacement (Gumbel top-r) with the paper's
  probabilities ``p_i = ½ (1/k + s_i / Σ_j s_j)`` (a uniform term mixed with the
  singular-value weights; ``uniform_mix`` is the uniform share, ½ in the paper), re-drawn
  every ``every`` steps inside the compiled step;
* the sampled vectors follow the paper's *enhanced gradient* (``enhanced_grad``):
  ``∇̃U_·i = ∂L/∂W · V_·i`` and ``∇̃V_·i = (∂L/∂W)ᵀ · U_·i``, autodiff's ``∂L/∂U_·i`` and
  ``∂L/∂V_·i`` without their factor ``s_i`` (recovered exactly as ``∂L/∂U_·i / s_i``; a vector
  whose ``s_i`` is 0 gets no direction from autodiff and stays put until ``s_i`` grows again),
  and after the update each is re-normalised to unit length (``normalize``: the magnitude
  lives in ``s``);
* the inner optimizer sees the sampled vectors only: its moments of ``U`` and ``Vᵀ`` are
  ``[m, r]`` and ``[r, n]`` (the memory saving), and they restart from ``inner.init`` of the
  new set when one is drawn (they belonged to the previous vectors). ``s``, every other leaf
  and the inner state's shared entries (Adam's step count, a schedule's count) carry on;
* every ``svd_every`` steps (the end of a *round*; by default ``every · ceil(k / r)`` steps,
  enough draws for ``k`` vectors at ``r`` a draw), after the ordinary update, each triple is
  re-initialised from the SVD of its current merged weight, as the paper does to restore the
  orthogonality that training erodes: :func:`resvd` gives ``U' diag(s') V'ᵀ = U diag(s) Vᵀ``
  (to fp32 rounding) with orthonormal ``U'``, ``V'`` and ``s' >= 0`` sorted, without forming
  the ``[m, n]`` weight. The moments of ``U``, ``s`` and ``Vᵀ`` restart then (they belonged to
  the old basis); ``svd_every`` is a multiple of ``every``, so the next step draws a new set
  from ``s'``.

``sst`` expects the raw gradients as its ``updates`` (put it first in a chain): the enhanced
gradient divides them by ``s``. ``uniform_mix=0, enhanced_grad=False, normalize=False,
clamp_s=False`` gives the plain variant (probabilities ``|s_i| / Σ|s|``, autodiff gradients).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxattn.optim._plan import flatten
from jaxattn.optim.projectors import sign_convention

__all__ = ["sst", "SSTState", "sample_vectors", "sampling_probabilities", "resvd"]


class SSTState(NamedTuple):
    """State of :func:`sst`: step ``count``, the sampling ``key`` (key data), the sampled
    ``index`` [r] of each spectral triple (in tree order) and the inner state."""

    count: jax.Array
    key: jax.Array
    index: tuple
    inner: optax.OptState


def sampling_probabilities(s_k: jax.Array, uniform_mix: float = 0.5) -> jax.Array:
    """SST's multinomial weights ``p_i = uniform_mix / k + (1 − uniform_mix) |s_i| / Σ_j |s_j|``
    (fp32 [k]; the paper's ``½ (1/k + Σ_i / Σ_j Σ_j)`` at ``uniform_mix = ½``). An all-zero
    spectrum gives the uniform ``1/k``."""
    weights = jnp.abs(s_k.astype(jnp.float32))
    total = jnp.sum(weights)
    k = s_k.shape[0]
    by_s = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 1.0 / k)
    return uniform_mix / k + (1.0 - uniform_mix) * by_s


def _check_mix(uniform_mix) -> float:
    if (
        isinstance(uniform_mix, bool) or not isinstance(uniform_mix, (int, float))
        or not 0.0 <= uniform_mix <= 1.0
    ):  # fmt: skip
        raise ValueError(f"sst: uniform_mix={uniform_mix!r} must be a number in [0, 1]")
    return float(uniform_mix)


def sample_vectors(
    key: jax.Array, s_k: jax.Array, rank: int, *, uniform_mix: float = 0.5
) -> jax.Array:
    """``rank`` distinct indices into ``s_k`` drawn without replacement with the probabilities
    of :func:`sampling_probabilities` (sorted int32 [rank])."""
    p = sampling_probabilities(s_k, _check_mix(uniform_mix))
    # Gumbel top-r: the first draw has P(i) = p_i, later ones follow without replacement; a
    # zero p_i (uniform_mix 0, s_i 0) is never drawn while another index is left
    gumbel = jax.random.gumbel(key, p.shape)
    _, idx = jax.lax.top_k(jnp.log(p) + gumbel, rank)
    return jnp.sort(idx).astype(jnp.int32)


def resvd(u_mk: jax.Array, s_k: jax.Array, vt_kn: jax.Array):
    """``(U', s', V'ᵀ)``: the SVD of the merged weight ``W = U diag(s) Vᵀ``, through thin QRs
    ``U = Q_U R_U``, ``V = Q_V R_V`` and the SVD of the ``[k, k]`` core ``R_U diag(s) R_Vᵀ`` (W
    is never formed; it has rank <= k, so k triplets reproduce it). Computed in fp32, returned
    in the inputs' dtypes; the columns of ``U'`` follow the sign convention of ``projectors``
    (the rows of ``V'ᵀ`` flip with them), so the result is deterministic."""
    u32, s32, vt32 = (x.astype(jnp.float32) for x in (u_mk, s_k, vt_kn))
    q_u, r_u = jnp.linalg.qr(u32)
    q_v, r_v = jnp.linalg.qr(vt32.T)
    a, sigma, bh = jnp.linalg.svd((r_u * s32) @ r_v.T)
    u_new = q_u @ a
    flipped = sign_convention(u_new, axis=0)
    sign = jnp.sum(flipped * u_new, axis=0)  # ±1 per column
    vt_new = (bh * sign[:, None]) @ q_v.T
    return flipped.astype(u_mk.dtype), sigma.astype(s_k.dtype), vt_new.astype(vt_kn.dtype)


def _triples(params, names) -> list[tuple[int, int, int]]:
    paths, xs, _ = flatten(params)
    index = {p: i for i, p in enumerate(paths)}
    u_name, s_name, vt_name = names
    out = []
    for path, i in index.items():
        parent, _, name = path.rpartition("/")
        sib = lambda n: f"{parent}/{n}" if parent else n  # noqa: E731
        if name == u_name and sib(s_name) in index and sib(vt_name) in index:
            out.append((i, index[sib(s_name)], index[sib(vt_name)]))
    if not out:
        raise ValueError(
            f"sst: no spectral triple of sibling leaves named {names!r}; paths look like "
            f"{paths[:4]}"
        )
    return out


def sst(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    every: int,
    svd_every: int | None = None,
    seed: int = 0,
    names: tuple[str, str, str] = ("u", "s", "vt"),
    uniform_mix: float = 0.5,
    enhanced_grad: bool = True,
    normalize: bool = True,
    clamp_s: bool = True,
) -> optax.GradientTransformation:
    """``inner`` with SST's sampled singular-vector updates (module docstring).

    Args:
      inner: the optimizer of the sampled vectors, of ``s`` and of every other leaf (e.g.
        ``optax.adamw(lr)``); it sees ``U`` / ``Vᵀ`` leaves as ``[m, r]`` / ``[r, n]``.
      rank: r, the singular-vector pairs updated per step (``1 <= r <= k`` of every triple).
      every: steps between two draws (> 0); the first draw is at ``init``.
      svd_every: steps between two re-SVDs of every triple (a positive multiple of
        ``every``); None: one round, ``every · ceil(k / rank)`` with k the largest spectrum.
      seed: the sampling key's seed.
      names: leaf names of ``U`` [m, k], ``s`` [k] and ``Vᵀ`` [k, n] under one parent.
      uniform_mix: the uniform share of the sampling probabilities, in [0, 1]
        (:func:`sampling_probabilities`; the paper's ½; 0: ``|s_i| / Σ|s|``).
      enhanced_grad: the sampled vectors get the paper's enhanced gradient
        ``∂L/∂W · V_·i`` / ``(∂L/∂W)ᵀ · U_·i`` (autodiff's divided by ``s_i``), not autodiff's.
      normalize: re-normalise each updated vector (columns of ``U``, rows of ``Vᵀ``) to unit
        length after the update, as the paper does.
      clamp_s: clamp ``s`` at 0 after the update (the paper's ``max(Σ, 0)``).

    Raises:
      ValueError: a bad ``rank`` / ``every`` / ``svd_every`` / ``uniform_mix`` / flag (naming
        the argument or the triple), no triple found, or ``update`` without ``params``.
    """
    for field, value in (("rank", rank), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"sst: {field}={value!r} must be a positive int")
    if svd_every is not None and (
        isinstance(svd_every, bool) or not isinstance(svd_every, int) or svd_every <= 0
        or svd_every % every
    ):  # fmt: skip
        raise ValueError(f"sst: svd_every={svd_every!r} must be a positive multiple of {every=}")
    uniform_mix = _check_mix(uniform_mix)
    for field, value in (("enhanced_grad", enhanced_grad), ("normalize", normalize),
                         ("clamp_s", clamp_s)):  # fmt: skip
        if not isinstance(value, bool):
            raise ValueError(f"sst: {field}={value!r} must be a bool")

    def period(params, triples):
        if svd_every is not None:
            return svd_every
        _, xs, _ = flatten(params)
        return every * math.ceil(max(xs[i_s].shape[0] for _, i_s, _ in triples) / rank)

    def check(params):
        paths, xs, _ = flatten(params)
        triples = _triples(params, names)
        for i_u, i_s, i_v in triples:
            u, s, vt = xs[i_u], xs[i_s], xs[i_v]
            k = s.shape[0] if s.ndim == 1 else -1
            if u.ndim != 2 or vt.ndim != 2 or u.shape[1] != k or vt.shape[0] != k:
                raise ValueError(
                    f"sst: {paths[i_u]!r} {u.shape}, s {s.shape}, vt {vt.shape} are not "
                    "U [m, k], s [k], Vᵀ [k, n]"
                )
            if rank > k:
                raise ValueError(
                    f"sst: rank={rank} is larger than the spectrum k={k} of {paths[i_u]!r}"
                )
        return triples

    def draw(key, params, triples):
        _, xs, _ = flatten(params)
        keys = jax.random.split(key, len(triples))
        return tuple(
            sample_vectors(k, xs[i_s], rank, uniform_mix=uniform_mix)
            for k, (_, i_s, _) in zip(keys, triples)
        )

    def reduce(tree, index, triples):
        """``tree`` (params or grads) with each U / Vᵀ cut to its sampled vectors."""
        _, xs, treedef = flatten(tree)
        xs = list(xs)
        for idx, (i_u, _, i_v) in zip(index, triples):
            xs[i_u], xs[i_v] = xs[i_u][:, idx], xs[i_v][idx, :]
        return treedef.unflatten(xs)

    def init_fn(params):
        triples = check(params)
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        index = draw(sub, params, triples)
        state = inner.init(reduce(params, index, triples))
        return SSTState(jnp.zeros([], jnp.int32), jax.random.key_data(key), index, state)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("sst needs params in update (it samples from the singular values)")
        triples = _triples(params, names)
        paths, _, _ = flatten(params)
        vector_paths = tuple(paths[i] for t in triples for i in (t[0], t[2]))

        def redraw(key, index, inner_state):
            key, sub = jax.random.split(jax.random.wrap_key_data(key))
            index = draw(sub, params, triples)
            fresh = inner.init(reduce(params, index, triples))
            return jax.random.key_data(key), index, _reset(inner_state, fresh, vector_paths)

        due = (state.count > 0) & (state.count % every == 0)
        key, index, inner_state = jax.lax.cond(
            due, redraw, lambda *a: a, state.key, state.index, state.inner
        )
        grads = reduce(updates, index, triples)
        if enhanced_grad:
            grads = _enhance(grads, params, index, triples)
        low, inner_state = inner.update(grads, inner_state, reduce(params, index, triples))
        _, us, treedef = flatten(updates)
        _, lows, _ = flatten(low)
        _, ps, _ = flatten(params)
        out = list(lows)
        for idx, (i_u, i_s, i_v) in zip(index, triples):  # unsampled vectors: exactly no update
            lu, lv = lows[i_u], lows[i_v]
            if normalize:  # unit-length vectors after the step: U_·i, V_·i ← x / ‖x‖
                lu = _unit(ps[i_u][:, idx] + lu, axis=0) - ps[i_u][:, idx]
                lv = _unit(ps[i_v][idx, :] + lv, axis=1) - ps[i_v][idx, :]
            out[i_u] = jnp.zeros_like(us[i_u]).at[:, idx].set(lu.astype(us[i_u].dtype))
            out[i_v] = jnp.zeros_like(us[i_v]).at[idx, :].set(lv.astype(us[i_v].dtype))
            if clamp_s:  # s ← max(s + Δs, 0)
                s = ps[i_s]
                out[i_s] = (jnp.maximum(s + out[i_s], 0) - s).astype(out[i_s].dtype)
        count = optax.safe_increment(state.count)
        triple_paths = tuple(paths[i] for t in triples for i in t)

        def respectral(out, inner_state):  # the end of a round: re-SVD after the update
            _, ps, _ = flatten(params)
            out, new = list(out), list(ps)
            for i_u, i_s, i_v in triples:
                merged = [ps[i] + out[i] for i in (i_u, i_s, i_v)]
                fresh = resvd(*merged)
                for i, p, f in zip((i_u, i_s, i_v), (ps[i_u], ps[i_s], ps[i_v]), fresh):
                    new[i], out[i] = f, f - p
            fresh = inner.init(reduce(treedef.unflatten(new), index, triples))
            return out, _reset(inner_state, fresh, triple_paths)

        out, inner_state = jax.lax.cond(
            count % period(params, triples) == 0, respectral, lambda *a: a, out, inner_state
        )
        return treedef.unflatten(out), SSTState(count, key, index, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def _enhance(grads, params, index, triples):
    """The paper's enhanced gradients of the sampled vectors: autodiff gives
    ``∂L/∂U_·i = s_i ∂L/∂W V_·i`` and ``∂L/∂Vᵀ_i· = s_i U_·iᵀ ∂L/∂W``; divided by ``s_i`` they
    are ``∂L/∂W V_·i`` and ``U_·iᵀ ∂L/∂W``. Where ``s_i`` is 0 the gradient is 0 either way."""
    _, gs, treedef = flatten(grads)
    _, ps, _ = flatten(params)
    gs = list(gs)
    for idx, (i_u, i_s, i_v) in zip(index, triples):
        s = ps[i_s][idx].astype(jnp.float32)
        inv = jnp.where(s != 0, 1.0 / jnp.where(s != 0, s, 1.0), 0.0)
        gs[i_u] = (gs[i_u].astype(jnp.float32) * inv).astype(gs[i_u].dtype)
        gs[i_v] = (gs[i_v].astype(jnp.float32) * inv[:, None]).astype(gs[i_v].dtype)
    return treedef.unflatten(gs)


def _unit(x, axis):
    """``x`` scaled to unit L2 norm along ``axis`` (computed in fp32; a zero vector stays 0)."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=axis, keepdims=True))
    return (x32 / jnp.where(norm > 0, norm, 1.0)).astype(x.dtype)


def _reset(old, fresh, paths: tuple[str, ...]):
    """``old`` with the leaves that track one of ``paths`` (their path ends with it: Adam's
    ``mu`` / ``nu`` of that parameter) taken from ``fresh``."""
    old_paths, olds, treedef = flatten(old)
    _, freshes, _ = flatten(fresh)
    out = [
        f if any(p == q or p.endswith("/" + q) for q in paths) else o
        for p, o, f in zip(old_paths, olds, freshes)
    ]
    return treedef.unflatten(out)
