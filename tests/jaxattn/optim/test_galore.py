"""GaLore (jaxattn.optim.galore): PAPERS.md §8 faithful tests, projectors, robustness, seams."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattn import optim


def _normal(seed, shapes):
    """Standard-normal fp32 arrays drawn with numpy (eager jax.random compiles per shape)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _svd_left(g, r):
    u, _, _ = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return np.asarray(optim.sign_convention(jnp.asarray(u[:, :r], jnp.float32), axis=0))


def test_moments_live_in_the_projected_shapes():
    shapes = {"tall": (40, 24), "wide": (24, 40), "t3": (8, 3, 10), "o": (2, 4, 16), "b": (24,)}
    params = _normal(0, shapes)
    fan_in = lambda path, shape: 2 if path == "o" else 1
    tx = optim.galore(optax.scale_by_adam(), rank=4, update_proj_gap=3, fan_in_axes=fan_in)
    st = jax.eval_shape(tx.init, params)
    shape = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shape(st.inner.mu) == {
        "tall": (40, 4),  # right projection (m >= n): G Qᵀ
        "wide": (4, 40),  # left projection: Pᵀ G
        "t3": (4, 30),  # [8, 3, 10] viewed as [8, 30]
        "o": (4, 16),  # fan_in_axes=2: [2, 4, 16] viewed as [8, 16]
        "b": (24,),  # 1-D: the inner transform's own state
    }
    assert shape(st.right)["tall"] == (4, 24) and shape(st.left)["wide"] == (24, 4)
    assert isinstance(st.left["tall"], optax.MaskedNode) and isinstance(
        st.left["b"], optax.MaskedNode
    )
    full = jax.eval_shape(
        optim.galore(
            optax.scale_by_adam(), rank=4, update_proj_gap=3, proj_type="full", fan_in_axes=fan_in
        ).init,
        params,
    )
    assert shape(full.inner.mu)["tall"] == (4, 4)
    assert shape(full.left)["tall"] == (40, 4) and shape(full.right)["tall"] == (4, 24)


def test_refresh_exactly_every_T_updates_in_the_subspace_no_recompilation():
    shapes = {"tall": (40, 24), "wide": (24, 40), "b": (40,)}
    tx = optim.galore(optax.scale_by_adam(), rank=4, update_proj_gap=3, scale=0.5)
    update = jax.jit(tx.update)
    state = jax.jit(tx.init)(_normal(0, shapes))
    prev = state
    for t in range(7):
        g = _normal(10 + t, shapes)
        u, state = update(g, state)
        p_wide, q_tall = np.asarray(state.left["wide"]), np.asarray(state.right["tall"])
        if t % 3 == 0:  # recomputed from this step's gradient (fp32 SVD against fp64 numpy's:
            # a singular vector's error grows as eps·σ_1 / its gap, ~1e-2 for these gradients)
            np.testing.assert_allclose(p_wide, _svd_left(g["wide"], 4), atol=1e-4)
            np.testing.assert_allclose(q_tall, _svd_left(g["tall"].T, 4).T, atol=1e-4)
        else:  # kept
            np.testing.assert_array_equal(p_wide, np.asarray(prev.left["wide"]))
            np.testing.assert_array_equal(q_tall, np.asarray(prev.right["tall"]))
        # each update lies in the column space of P (row space of Q)
        u_wide, u_tall = np.asarray(u["wide"]), np.asarray(u["tall"])
        np.testing.assert_allclose(u_wide - p_wide @ (p_wide.T @ u_wide), 0, atol=1e-6)
        np.testing.assert_allclose(u_tall - (u_tall @ q_tall.T) @ q_tall, 0, atol=1e-6)
        assert np.abs(u_wide).max() > 1e-3
        prev = state
    assert int(state.count) == 7
    assert update._cache_size() == 1  # the refresh is a lax.cond, not a retrace


def test_full_rank_is_exactly_the_inner_transform():
    shapes = {"tall": (12, 8), "wide": (8, 12), "square": (8, 8), "t3": (4, 2, 6), "b": (8,)}
    params = _normal(0, shapes)
    full = lambda path, shape: None if len(shape) < 2 else min(shape[0], int(np.prod(shape[1:])))
    inner = optax.adam(1e-2)
    txs = {
        "svd": optim.galore(inner, rank=full, update_proj_gap=2),
        "randomized": optim.galore(inner, rank=full, update_proj_gap=2, projector="randomized"),
        "dct": optim.galore(inner, rank=full, update_proj_gap=2, projector="dct"),
        "fira": optim.fira(inner, rank=full, update_proj_gap=2),
        "full": optim.galore(
            inner,
            rank=lambda p, s: 8 if p == "square" else None,
            update_proj_gap=2,
            proj_type="full",
        ),
    }

    def run(tx):
        state, out, update = jax.jit(tx.init)(params), [], jax.jit(tx.update)
        for t in range(4):
            u, state = update(_normal(20 + t, shapes), state, params)
            out.append(u)
        return out

    want = run(inner)
    for name, tx in txs.items():
        for a, b in zip(jax.tree.leaves(run(tx)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("projector", ["svd", "randomized", "dct"])
def test_projector_never_nan(projector):
    """Zero, rank-deficient, 1e30 and 1e-30 gradients give finite orthonormal projectors (the
    same ones for any positive scale); a NaN gradient keeps the previous projector."""
    shapes = {"w": (24, 40)}
    tx = optim.galore(optax.scale_by_adam(), rank=4, update_proj_gap=1, projector=projector)
    update = jax.jit(tx.update)
    state0 = jax.jit(tx.init)(_normal(0, shapes))
    g = _normal(1, shapes)["w"]  # numpy cases and checks: no eager jax programs
    a, b = _normal(2, {"a": (24, 1), "b": (1, 40)}).values()
    nan = g.copy()
    nan[3, 5] = np.nan
    cases = {
        "zero": np.zeros_like(g),
        "rank1": a @ b,
        "huge": np.float32(1e30) * g,
        "tiny": np.float32(1e-30) * g,
        "nan": nan,
        "plain": g,
    }
    basis = jax.jit(optim.dct_basis, static_argnums=0)
    got = {}
    for name, case in cases.items():
        u, st = update({"w": case}, state0)
        p = np.asarray(st.left["w"])
        p_mr = np.asarray(basis(24, p)) if projector == "dct" else p
        assert np.all(np.isfinite(p_mr)), name
        np.testing.assert_allclose(p_mr.T @ p_mr, np.eye(4), atol=1e-5, err_msg=name)
        if name != "nan":
            assert np.all(np.isfinite(np.asarray(u["w"]))), name
        got[name] = p
    for kept in ("zero", "nan"):  # unusable gradients keep the initial projector
        np.testing.assert_array_equal(got[kept], np.asarray(state0.left["w"]))
    tol = 0 if projector == "dct" else 1e-4  # fp32 SVDs of differently rounded inputs
    np.testing.assert_allclose(got["huge"], got["plain"], atol=tol)
    np.testing.assert_allclose(got["tiny"], got["plain"], atol=tol)


def test_sign_convention_makes_the_projector_independent_of_the_svd_sign():
    shapes = {"wide": (24, 40), "tall": (40, 24)}
    tx = optim.galore(optax.scale_by_adam(), rank=5, update_proj_gap=4)
    update = jax.jit(tx.update)
    g = _normal(3, shapes)
    st_pos = update(g, jax.jit(tx.init)(g))[1]
    st_neg = update(jax.tree.map(np.negative, g), jax.jit(tx.init)(g))[1]
    for side, key, axis in (("left", "wide", 0), ("right", "tall", 1)):
        pos, neg = np.asarray(getattr(st_pos, side)[key]), np.asarray(getattr(st_neg, side)[key])
        np.testing.assert_allclose(pos, neg, atol=1e-6)
        peak = np.take_along_axis(pos, np.argmax(np.abs(pos), axis, keepdims=True), axis)
        assert np.all(peak > 0)
    x = np.array([[1.0, -3.0], [-2.0, 1.0]], np.float32)
    convention = jax.jit(optim.sign_convention, static_argnums=1)
    np.testing.assert_array_equal(convention(x, 0), [[-1.0, 3.0], [2.0, -1.0]])
    np.testing.assert_array_equal(convention(x, 1), [[-1.0, 3.0], [2.0, -1.0]])


def test_randomized_projector_finds_the_svd_subspace():
    rng = np.random.default_rng(0)  # numpy: no eager jax programs
    u, _ = np.linalg.qr(rng.standard_normal((64, 4)))
    v, _ = np.linalg.qr(rng.standard_normal((48, 4)))
    g = (u * np.array([8.0, 6.0, 4.0, 3.0])) @ v.T + 1e-3 * rng.standard_normal((64, 48))
    g = g.astype(np.float32)
    plans = {}
    for name in ("svd", "randomized"):
        tx = optim.galore(
            optax.scale_by_adam(), rank=4, update_proj_gap=1, proj_type="left", projector=name
        )
        state = jax.jit(lambda g: tx.update(g, tx.init(g))[1])({"w": g})
        plans[name] = np.asarray(state.left["w"])
    np.testing.assert_allclose(plans["randomized"], plans["svd"], atol=1e-3)


def test_dct_projector_selects_top_columns_and_stores_only_indices():
    """DCT projection: dct_basis is the orthonormal DCT-II (Qᵀx = dct(x, ortho)), exact at N =
    4096; a refresh keeps the r columns of Q with the largest ‖Qᵀ G‖ (left) / ‖G Q‖ (right),
    stores only their int32 indices, and the update lies in the span they rebuild. Every jax
    computation is one jitted program per shape (eager ops compile one program each)."""
    rng = np.random.default_rng(0)

    @jax.jit
    def basis_and_dct(x):
        q = optim.dct_basis(x.shape[0])
        return q, jax.scipy.fft.dct(x, type=2, norm="ortho", axis=0)

    for n in (16, 37):
        x = rng.standard_normal((n, 3)).astype(np.float32)
        q, want = (np.asarray(a) for a in basis_and_dct(x))
        np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-5)
        np.testing.assert_allclose(q.T @ x, want, atol=1e-5)
    cols = np.array([0, 1, 2047, 4095])
    big = np.asarray(jax.jit(lambda k: optim.dct_basis(4096, k))(jnp.asarray(cols)))
    i = np.arange(4096)[:, None]
    exact = np.cos(np.pi * (2 * i + 1) * cols / 8192) * np.where(
        cols == 0, np.sqrt(1 / 4096), np.sqrt(2 / 4096)
    )
    np.testing.assert_allclose(big, exact, atol=2e-7)  # integer phase: exact even at N = 4096

    g = {"wide": rng.standard_normal((24, 40)).astype(np.float32),
         "tall": rng.standard_normal((40, 24)).astype(np.float32)}  # fmt: skip
    tx = optim.galore(optax.scale_by_adam(), rank=5, update_proj_gap=3, projector="dct")
    u, st, q24 = jax.jit(lambda g: (*tx.update(g, tx.init(g)), optim.dct_basis(24)))(g)
    left, right, q24 = st.left["wide"], st.right["tall"], np.asarray(q24)
    assert left.dtype == jnp.int32 and left.shape == (5,) and right.shape == (5,)
    scores_l = np.linalg.norm(q24.T @ g["wide"], axis=1)
    scores_r = np.linalg.norm(g["tall"] @ q24, axis=0)
    np.testing.assert_array_equal(np.asarray(left), np.argsort(-scores_l)[:5])
    np.testing.assert_array_equal(np.asarray(right), np.argsort(-scores_r)[:5])
    p = q24[:, np.asarray(left)]  # the projector, rebuilt from the indices alone
    uw = np.asarray(u["wide"])
    np.testing.assert_allclose(uw - p @ (p.T @ uw), 0, atol=1e-6)
    assert np.abs(uw).max() > 1e-3


def test_per_path_ranks_inside_multi_transform():
    """Issue 13's path rules: a GaLore rule for some leaves inside optax.multi_transform (which
    hands it MaskedNodes for the others) equals GaLore run on those leaves alone."""
    shapes = {"attn": {"q": (16, 24), "o": (24, 16)}, "mlp": {"up": (16, 32)}, "norm": (16,)}
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    params = jax.tree.map(lambda s: np.ones(s, np.float32), shapes, is_leaf=is_shape)
    labels = {"attn": {"q": "galore", "o": "galore"}, "mlp": {"up": "adam"}, "norm": "adam"}
    rank = lambda path, shape: {"attn/q": 4, "attn/o": 6}[path]
    gal = optim.galore(optax.scale_by_adam(), rank=rank, update_proj_gap=2)
    tx = optax.multi_transform({"galore": gal, "adam": optax.scale_by_adam()}, labels)
    state, alone = jax.jit(tx.init)(params), jax.jit(gal.init)({"attn": params["attn"]})
    update, update_alone = jax.jit(tx.update), jax.jit(gal.update)
    for t in range(3):
        rng = np.random.default_rng(t)
        g = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        u, state = update(g, state)
        ua, alone = update_alone({"attn": g["attn"]}, alone)
        for a, b in zip(jax.tree.leaves(u["attn"]), jax.tree.leaves(ua["attn"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert state.inner_states["galore"].inner_state.left["attn"]["q"].shape == (16, 4)
