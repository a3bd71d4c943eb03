"""Factorised kernels (lowrank, sltrain, sst) in Linear's form slot: PAPERS.md §8's faithful
tests for SLTrain, SST and W = BA refactorisation, forward and gradients against the dense
reference W = matrix(factors), parameter counts from the formulas, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn import optim
from jaxattn.layers import FixedSupport, Linear, factorize
from models import DecoderLM, get_config

M, N, H = 12, 2, 5  # Linear (12,) -> (2, 5): the matrix view [12, 10]
X = jax.random.normal(jax.random.key(0), (3, 4, M))
AXES = ("embed", "heads", "head_dim")


def _linear(form, rank=4, density=0.2, seed=1, **kwargs):
    lin = Linear((M,), (N, H), axes=AXES, use_bias=True, rngs=nnx.Rngs(0))
    lin.bias[...] = jnp.arange(N * H, dtype=jnp.float32).reshape(N, H) / 10
    factorize(lin, form, rank=rank, density=density, rngs=nnx.Rngs(seed), **kwargs)
    if form == "sltrain":  # a non-zero output factor, so B·A enters the checks
        lin.form.a[...] = jax.random.normal(jax.random.key(7), lin.form.a.shape) * 0.3
    return lin


def _dense_out(lin, x):
    """The reference: x · W + b with W the dense matrix of the factors."""
    w = lin.as_matrix().reshape(M, N, H)
    return jnp.einsum("btm,mnh->btnh", x, w) + lin.bias[...]


@pytest.mark.parametrize("form", ["lowrank", "sltrain", "sst"])
def test_forward_and_gradients_match_the_dense_reference(form):
    lin = _linear(form)
    assert lin.kernel is None and lin.form.name == form
    np.testing.assert_allclose(lin(X), _dense_out(lin, X), rtol=1e-5, atol=1e-5)
    assert lin.effective_kernel().shape == (M, N, H)
    graphdef, params, rest = nnx.split(lin, nnx.Param, ...)

    def loss(params, dense, x):
        model = nnx.merge(graphdef, params, rest)
        y = _dense_out(model, x) if dense else model(x)
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    for x in (X[:1, :2], X):  # sltrain: the gather path (N nnz <= m n), then the dense one
        for a, b in zip(
            jax.tree.leaves(grad(params, False, x)), jax.tree.leaves(grad(params, True, x))
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # parameter counts: r(m+n), r(m+n) + int(density m n), k(m+n+1); plus the bias
    expected = optim.form_param_count(form, M, N * H, rank=4, density=0.2) + N * H
    assert sum(v.size for v in jax.tree.leaves(params)) == expected
    assert lin.form.num_params() == expected - N * H


def test_sltrain_forward_is_xBA_alpha_over_r_plus_xS_on_a_fixed_support():
    """SLTrain: y = x·B·A·(alpha/r) + x·S + bias (the authors' SpLoRaLinear, scale
    lora_alpha / r, default alpha 32) against a dense numpy reference; the support is
    reproducible from the key and fixed across steps; d loss / d s is the dense gradient x^T g
    at the support entries (the only sparse gradients)."""
    assert _linear("sltrain").form.scale == 32 / 4  # the authors' default alpha = 32
    a, b = _linear("sltrain", seed=3, alpha=8.0), _linear("sltrain", seed=3, alpha=8.0)
    assert a.form.scale == 8.0 / 4
    assert isinstance(a.form.support, FixedSupport)  # not an nnx.Param: never trained
    idx = np.asarray(a.form.support[...])
    nnz = int(0.2 * M * N * H)
    assert idx.shape == (nnz,) and len(np.unique(idx)) == nnz and idx.max() < M * N * H
    np.testing.assert_array_equal(idx, np.asarray(b.form.support[...]))  # same key, same S
    c = _linear("sltrain", seed=4)
    assert not np.array_equal(idx, np.asarray(c.form.support[...]))  # another key, another
    # the equation, in numpy: y = x B A (alpha / r) + x S + bias, S = scatter(s) on the support
    s_dense = np.zeros(M * N * H, np.float32)
    s_dense[idx] = np.asarray(a.form.s[...])
    x2 = np.asarray(X).reshape(-1, M)
    b_mr, a_rn = np.asarray(a.form.b[...]), np.asarray(a.form.a[...])
    y = x2 @ b_mr @ a_rn * (8.0 / 4) + x2 @ s_dense.reshape(M, N * H)
    ref = y.reshape(3, 4, N, H) + np.asarray(a.bias[...])
    assert np.abs(x2 @ b_mr @ a_rn).max() > 0.1  # the low-rank term is not negligible
    # 12 rows: N nnz = 288 > m n = 120, S is scattered into a dense matrix; 2 rows: N nnz =
    # 48 <= 120, the gather + scatter-add path
    assert 2 * nnz <= M * N * H < 12 * nnz
    np.testing.assert_allclose(a(X), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a(X[:1, :2]), ref[:1, :2], rtol=1e-5, atol=1e-5)
    graphdef, params, rest = nnx.split(a, nnx.Param, ...)
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(X)))  # noqa: E731
    grads = jax.grad(loss)(params)
    # gradients only on the support: d s = (x^T g)[support] with g = d loss / d y
    g = jnp.cos(nnx.merge(graphdef, params, rest)(X)).reshape(-1, N * H)
    dense_grad = np.asarray(X.reshape(-1, M).T @ g).reshape(-1)
    np.testing.assert_allclose(grads["form"]["s"][...], dense_grad[idx], rtol=1e-4, atol=1e-5)
    # one optimizer step on the parameters: the support does not move
    tx = optax.adam(0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    nnx.update(a, optax.apply_updates(params, updates))
    np.testing.assert_array_equal(np.asarray(a.form.support[...]), idx)


def test_sst_reproduces_w_updates_sampled_vectors_only_and_samples_by_s():
    lin = Linear((M,), (N, H), axes=AXES, rngs=nnx.Rngs(0))
    w0 = lin.as_matrix()
    factorize(lin, "sst", rank=None)  # full spectrum k = min(m, n) = 10
    np.testing.assert_allclose(lin.as_matrix(), w0, atol=1e-6)  # U diag(s) Vᵀ reproduces W
    params = nnx.to_pure_dict(nnx.state(lin, nnx.Param))
    tx = optim.sst(optax.adam(1e-2), rank=3, every=2)
    state = tx.init(params)
    assert state.inner[0].mu["form"]["u"].shape == (M, 3)  # moments of the sampled vectors
    assert state.inner[0].mu["form"]["vt"].shape == (3, N * H)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    update = jax.jit(tx.update)
    updates, state1 = update(grads, state, params)
    chosen = np.asarray(state.index[0])
    changed_u = np.flatnonzero(np.any(np.asarray(updates["form"]["u"]) != 0, axis=0))
    changed_v = np.flatnonzero(np.any(np.asarray(updates["form"]["vt"]) != 0, axis=1))
    np.testing.assert_array_equal(changed_u, chosen)  # only the sampled vectors change
    np.testing.assert_array_equal(changed_v, chosen)
    assert np.all(np.asarray(updates["form"]["s"]) != 0)  # every singular value changes
    # redrawn at step 2 (inside the update), with the vectors' moments restarted
    _, state2 = update(grads, state1, params)
    _, state3 = update(grads, state2, params)
    assert np.array_equal(np.asarray(state2.index[0]), chosen)
    mu2, mu3 = state2.inner[0].mu, state3.inner[0].mu
    redrawn = not np.array_equal(np.asarray(state3.index[0]), chosen)
    assert redrawn and int(state3.count) == 3
    np.testing.assert_allclose(np.asarray(mu3["form"]["u"]), 0.1 * np.ones((M, 3)), rtol=1e-6)
    assert float(mu3["form"]["s"][0]) > float(mu2["form"]["s"][0])  # s keeps its moments
    # sampling probabilities are proportional to the singular values (20000 draws of 1)
    s = params["form"]["s"]
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: optim.sample_vectors(k, s, 1))(keys)[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=s.shape[0]) / 20000
    p = np.asarray(s / jnp.sum(s))
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / 20000).max())
    # with every vector sampled (rank = k), SST is its inner optimizer
    full, adam = optim.sst(optax.adam(1e-2), rank=10, every=2), optax.adam(1e-2)
    a, b = jax.jit(lambda g, p: (full.update(g, full.init(p), p)[0],
                                 adam.update(g, adam.init(p), p)[0]))(grads, params)  # fmt: skip
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sst_periodic_resvd_keeps_the_merged_weight_and_restores_orthonormal_factors():
    """SST's re-SVD at the end of a round (default period: one round, every·ceil(k/r) =
    2·ceil(10/3) = 8 steps; after the update): U'·diag(s')·V'ᵀ equals the merged weight the
    same step gives without it (to fp32 rounding), U' and V' are orthonormal (they had
    drifted), s' >= 0 sorted, the triple's moments restart, the other leaves' do not; the next
    step draws from s'."""
    lin = Linear((M,), (N, H), axes=AXES, rngs=nnx.Rngs(0))
    factorize(lin, "sst", rank=None)  # k = 10
    params = {**nnx.to_pure_dict(nnx.state(lin, nnx.Param)), "bias": jnp.ones(3)}
    rng = np.random.default_rng(0)  # numpy draws: jax.random compiles once per shape
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    merged = lambda p: (p["form"]["u"] * p["form"]["s"]) @ p["form"]["vt"]  # noqa: E731
    with_svd = optim.sst(optax.adam(0.05), rank=3, every=2)  # svd_every None: 8
    without = optim.sst(optax.adam(0.05), rank=3, every=2, svd_every=400)
    step = jax.jit(lambda g, s, p: (with_svd.update(g, s, p), without.update(g, s, p)))
    state, eye = with_svd.init(params), np.eye(10)
    for i in range(8):
        (updates, new_state), (plain, _) = step(grads, state, params)
        if i < 7:  # ordinary steps: the two agree
            for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(plain)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        params, state = optax.apply_updates(params, updates), new_state
    u, s, vt = (np.asarray(params["form"][n]) for n in ("u", "s", "vt"))
    drifted = optax.apply_updates(jax.tree.map(lambda p, u: p - u, params, updates), plain)
    assert np.abs(np.asarray(drifted["form"]["u"]).T @ drifted["form"]["u"] - eye).max() > 1e-2
    np.testing.assert_allclose(merged(params), merged(drifted), atol=2e-6)  # W unchanged
    np.testing.assert_allclose(u.T @ u, eye, atol=1e-5)  # U'ᵀU' = I
    np.testing.assert_allclose(vt @ vt.T, eye, atol=1e-5)  # V'ᵀV' = I
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)
    np.testing.assert_array_equal(params["bias"], drifted["bias"])
    mu = state.inner[0].mu
    assert all(float(jnp.abs(mu["form"][n]).max()) == 0 for n in ("u", "s", "vt"))
    assert float(jnp.abs(mu["bias"]).max()) > 0 and int(state.inner[0].count) == 8
    (_, redrawn), _ = step(grads, state, params)
    sub = jax.random.split(jax.random.wrap_key_data(state.key))[1]  # as sst's redraw splits
    want = optim.sample_vectors(jax.random.split(sub, 1)[0], jnp.asarray(s), 3)
    np.testing.assert_array_equal(redrawn.index[0], want)  # drawn from s', not the old s
    # resvd alone, on a non-orthonormal triple: the same W, orthonormal factors
    u0, s0, vt0 = (jnp.asarray(rng.standard_normal(sh), jnp.float32)
                   for sh in [(M, 6), (6,), (6, N * H)])  # fmt: skip
    u1, s1, vt1 = jax.jit(optim.resvd)(u0, s0, vt0)
    np.testing.assert_allclose((u1 * s1) @ vt1, (u0 * s0) @ vt0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u1.T @ u1, np.eye(6), atol=1e-5)


def test_lowrank_refactor_keeps_the_function_resets_moments_not_the_schedule():
    """W = BA refactorisation at the scheduled step leaves the layer's output unchanged (to
    fp32 rounding) and zeroes the moments exactly then; the lr schedule goes on."""
    lin = _linear("lowrank", rank=3)
    graphdef, params, rest = nnx.split(lin, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    adam = optax.adam(optax.linear_schedule(1e-2, 0.0, 10))
    tx = optim.lowrank_refactor(adam, every=2)
    state, s_plain = tx.init(params), adam.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    out = lambda p: nnx.merge(graphdef, nnx.State(p), rest)(X)  # noqa: E731
    for step in range(2):
        updates, state = tx.update(grads, state, params)
        plain, s_plain = adam.update(grads, s_plain, params)
        if step == 0:  # an ordinary step: the inner optimizer's update, moments kept
            for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(plain)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            assert float(jnp.abs(state.inner[0].mu["form"]["b"]).max()) > 0
        else:  # step 2 refactors: the same function as the plain update, new factors
            want = optax.apply_updates(params, plain)
            got = optax.apply_updates(params, updates)
            np.testing.assert_allclose(out(got), out(want), rtol=1e-5, atol=1e-6)
            assert not np.allclose(got["form"]["b"], want["form"]["b"])
        params = optax.apply_updates(params, updates)
    adam_state, schedule_state = state.inner
    assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(adam_state.mu))
    assert int(adam_state.count) == 0 and int(schedule_state.count) == 2
    b, a = params["form"]["b"], params["form"]["a"]
    np.testing.assert_allclose(b.T @ b, a @ a.T, atol=1e-6)  # balanced: both carry S


def test_model_parameterization_by_path_counts_and_decodes_with_the_same_weight(tmp_path):
    """mla-tiny with sltrain on attention + MLP: embeddings and head stay dense, the count
    is the formulas' sum, absorbed-latent decoding (MLA reads k_b / v_b through
    effective_kernel) gives the full forward's logits, and ``to_hf`` exports the products as
    dense kernels."""
    base = get_config("mla-tiny-default", d_model=32, num_layers=1, num_heads=2, mlp_dim=48,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      vocab_size=64, implementation="xla")  # fmt: skip
    dense = nnx.eval_shape(lambda: DecoderLM(base, rngs=nnx.Rngs(0)))
    config = base.replace(parameterization="sltrain", parameterization_rank=4, sltrain_alpha=16)
    make = lambda: DecoderLM(config, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())  # built in one program
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "embed/table" in flat and "lm_head/kernel" in flat
    assert "layers/0/mlp/down/form/s" in flat and "layers/0/attn/kv_a/form/b" in flat
    assert not any(p.startswith("layers/") and p.endswith("/kernel") for p in flat)
    from jaxattn.lowrank import linear_paths

    expected = 0
    for path, lin in linear_paths(dense).items():
        size = lin.kernel.size if lin.kernel is not None else 0
        if path.startswith("layers/"):
            size = optim.form_param_count("sltrain", lin.fan_in, lin.fan_out, rank=4,
                                          density=0.03)  # fmt: skip
        expected += size
    others = sum(v.size for p, v in flat.items() if "/form/" not in p and not p.endswith("kernel"))
    total = sum(v.size for v in flat.values())
    assert total == expected + others
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    prefill, _ = nnx.jit(lambda m, t: m.decode(t, m.init_cache(2, 8)))(model, tokens)
    np.testing.assert_allclose(prefill, logits, rtol=1e-4, atol=1e-4)

    # each support is sparse_support(support_key(sltrain_seed, path)): a function of the
    # config and the path alone, not of the parameter seed
    from jaxattn.layers._factorized import sparse_support, support_key

    lins = linear_paths(model)
    assert lins["layers/0/mlp/up"].form.scale == 16 / 4  # ModelConfig.sltrain_alpha / r
    for path, seed in (("layers/0/attn/q", 0), ("layers/0/mlp/up", 0), ("layers/0/mlp/up", 1)):
        lin = lins[path]
        want = sparse_support(support_key(seed, path), lin.fan_in, lin.fan_out, lin.form.nnz)
        assert np.array_equal(lin.form.support[...], want) == (seed == 0)
    import models

    load_file = pytest.importorskip("safetensors.numpy").load_file  # the export's extra

    models.to_hf(model, str(tmp_path / "hf"))  # the products, as dense HF [out, in] weights
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for ours, hf in (("mlp/down", "mlp.down_proj"), ("mlp/up", "mlp.up_proj")):
        w = np.asarray(lins[f"layers/0/{ours}"].as_matrix()).T
        np.testing.assert_array_equal(tensors[f"model.layers.0.{hf}.weight"], w)


def test_bad_input_names_the_field_and_the_layer():
    def lin():
        return Linear((M,), (N, H), axes=AXES, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match=r"rank=11 for the projection at 'layers/0/attn/q'"):
        factorize(lin(), "lowrank", rank=11, rngs=nnx.Rngs(0), path="layers/0/attn/q")
    with pytest.raises(ValueError, match=r"parameterization='svd' is not one of"):
        factorize(lin(), "svd", rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"density=0.001 gives no sparse entry"):
        factorize(lin(), "sltrain", rank=2, density=0.001, rngs=nnx.Rngs(0))
    table = nnx.Param(jnp.zeros((7, M)))
    tied = Linear((M,), (7,), axes=("embed", "vocab"), kernel=table, transposed=True)
    with pytest.raises(ValueError, match=r"cannot serve the projection at 'lm_head'"):
        factorize(tied, "sst", rank=None, path="lm_head")
    tiny = dict(d_model=32, num_layers=1, num_heads=2, mlp_dim=48, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, vocab_size=64)  # fmt: skip
    with pytest.raises(ValueError, match=r"parameterization='sltrian' .* did you mean"):
        get_config("mla-tiny-default", parameterization="sltrian", **tiny)
    with pytest.raises(ValueError, match=r"sltrain_density=1.5 must be"):
        get_config("mla-tiny-default", sltrain_density=1.5, **tiny)
    with pytest.raises(ValueError, match=r"parameterization_paths='\(' is not a regex"):
        get_config("mla-tiny-default", parameterization_paths="(", **tiny)
    config = get_config("mla-tiny-default", parameterization="lowrank", **tiny)
    with pytest.raises(ValueError, match=r"rank=40 for the projection at 'layers/0/attn/"):
        nnx.eval_shape(
            lambda: DecoderLM(config.replace(parameterization_rank=40), rngs=nnx.Rngs(0))
        )
    with pytest.raises(ValueError, match=r"parameterization_paths='\^nothing/' matches no"):
        nnx.eval_shape(
            lambda: DecoderLM(config.replace(parameterization_paths="^nothing/"), rngs=nnx.Rngs(0))
        )
    params = {"l": {"u": jnp.ones((4, 3)), "s": jnp.ones(3), "vt": jnp.ones((3, 5))}}
    with pytest.raises(ValueError, match=r"sst: rank=4 is larger than the spectrum k=3 of 'l/u'"):
        optim.sst(optax.adam(1e-3), rank=4, every=2).init(params)
    with pytest.raises(ValueError, match=r"sst: every=0 must be a positive int"):
        optim.sst(optax.adam(1e-3), rank=1, every=0)
    with pytest.raises(ValueError, match=r"sst: svd_every=5 must be a positive multiple of every"):
        optim.sst(optax.adam(1e-3), rank=1, every=2, svd_every=5)
    with pytest.raises(ValueError, match=r"sltrain_alpha=0 must be a finite number > 0"):
        get_config("mla-tiny-default", sltrain_alpha=0, **tiny)
    with pytest.raises(ValueError, match=r"parameterization='sltrain': alpha=-1.0 must be"):
        factorize(lin(), "sltrain", rank=2, density=0.5, alpha=-1.0, rngs=nnx.Rngs(0))
