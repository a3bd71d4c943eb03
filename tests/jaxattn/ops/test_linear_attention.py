"""jaxattn.ops.linear_attention: naive == chunked == recurrent, and the torch oracle.

* The three implementations agree, outputs, final states and gradients (q, k, v, gates, beta,
  initial state), over fuzzed awkward shapes: T not a chunk multiple, H in {64, 96, 128} with
  small T, GQA groups 1-4.
* flash-linear-attention 0.6.0's naive torch references (``fla/ops/<variant>/naive.py``, loaded
  by file path: ``fla.ops`` imports triton) on the same inputs, forward and backward.
* Katharopoulos et al. 2020 eq. 2-4 with φ = elu + 1 written out; chunked prefill + recurrent
  decode steps == the whole sequence; bf16; bad input.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops import linear_attention, retention_log_decay

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VARIANTS = ("linear_attn", "retention", "simple_gla", "gla", "delta_rule", "gated_delta_rule")
TOL = dict(atol=2e-4, rtol=2e-4)


def _inputs(variant, b, t, n, k, h, v, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    q, key, val = f(b, t, n, h), f(b, t, k, h), f(b, t, k, v)
    extra = {}
    if variant in ("delta_rule", "gated_delta_rule"):  # unit keys: the delta rule's setting
        key = key / jnp.linalg.norm(key, axis=-1, keepdims=True)
        extra["beta"] = jnp.asarray(r.uniform(0.05, 1, size=(b, t, k)), jnp.float32)
    else:
        q, key = q / np.sqrt(h) ** 0.5, key / np.sqrt(h) ** 0.5
    if variant in ("simple_gla", "gated_delta_rule"):
        extra["log_decay"] = jnp.asarray(-r.uniform(0.01, 0.7, size=(b, t, k)), jnp.float32)
    if variant == "gla":
        extra["log_decay"] = jnp.asarray(-r.uniform(0.01, 0.7, size=(b, t, k, h)), jnp.float32)
    if variant == "retention":
        extra["log_decay"] = retention_log_decay(k)
    return q, key, val, extra


def _fast(fn, *args):
    """``fn(*args)`` compiled with XLA's cheap passes (the test's time goes to compiling)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _value_and_grads(q, k, v, extra, state, ct, *, variant, impl, chunk, state_term=True):
    """Gradients of Σ o·ct (+ Σ sin(final state) when ``state_term``), and (o, state)."""

    def f(q, k, v, extra, state):
        o, s = linear_attention(
            q,
            k,
            v,
            variant=variant,
            implementation=impl,
            chunk_size=chunk,
            initial_state=state,
            return_state=True,
            **extra,
        )
        return jnp.sum(o * ct) + (jnp.sum(jnp.sin(s)) if state_term else 0.0), (o, s)

    return _fast(jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True), q, k, v, extra, state)


def _fuzz_shape(i):
    """(B, T, N, K, H, V, chunk) of case i: H cycles over 64 / 96 / 128 and G over 1..4 (so
    the six variants see all of them), T drawn never a chunk multiple."""
    r = np.random.default_rng(i)
    chunk = int(r.choice([8, 16]))
    t = int(chunk * r.integers(1, 3) + r.integers(1, chunk))
    g, k = 1 + i % 4, 1 + (i // 2) % 2
    return 1 + i % 2, t, g * k, k, (64, 96, 128)[i % 3], int(r.choice([16, 32])), chunk


@pytest.mark.parametrize("variant", VARIANTS)
def test_naive_chunked_recurrent_agree(variant):
    seed = VARIANTS.index(variant)
    b, t, n, k, h, v, chunk = shape = _fuzz_shape(seed)
    q, key, val, extra = _inputs(variant, b, t, n, k, h, v, seed)
    r = np.random.default_rng(seed + 1)
    state = jnp.asarray(0.1 * r.normal(size=(b, k, h, v)), jnp.float32)
    ct = jnp.asarray(r.normal(size=(b, t, n, v)), jnp.float32)
    run = lambda impl: _value_and_grads(  # noqa: E731
        q, key, val, extra, state, ct, variant=variant, impl=impl, chunk=chunk
    )
    ref_grads, (ref_o, ref_s) = run("naive")
    for impl in ("chunked", "recurrent"):
        grads, (o, s) = run(impl)
        np.testing.assert_allclose(o, ref_o, **TOL, err_msg=f"{impl} o {shape}")
        np.testing.assert_allclose(s, ref_s, **TOL, err_msg=f"{impl} state {shape}")
        for name, a, e in zip("q k v extra state".split(), grads, ref_grads, strict=True):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(e), strict=True):
                np.testing.assert_allclose(x, y, atol=1e-3, rtol=1e-3, err_msg=f"{impl} d{name}")


# -- flash-linear-attention's naive torch references ---------------------------------------------


def _fla_naive(variant):
    """``fla/ops/<variant>/naive.py`` of the installed package, without importing ``fla``."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("flash-linear-attention (test extra) is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "ops" / variant / "naive.py"
    mod_spec = importlib.util.spec_from_file_location(f"_fla_naive_{variant}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _torch_ref(variant, q, k, v, extra, torch):
    """fla's naive output [B, T, H, V] for our inputs (G = 1; head-first refs transposed)."""
    if variant == "linear_attn":
        return _fla_naive(variant).naive_recurrent_linear_attn(q, k, v)[0]
    if variant == "retention":  # head-first [B, H, T, D]; its own fixed decays
        tr = lambda x: x.transpose(1, 2)  # noqa: E731
        return tr(_fla_naive(variant).naive_retention(tr(q), tr(k), tr(v)))
    if variant == "simple_gla":
        return _fla_naive(variant).naive_recurrent_simple_gla(q, k, v, extra["log_decay"])[0]
    if variant == "gla":
        return _fla_naive(variant).naive_recurrent_gla(q, k, v, extra["log_decay"])[0]
    if variant == "delta_rule":  # head-first
        tr = lambda x: x.transpose(1, 2)  # noqa: E731
        o = _fla_naive(variant).delta_rule_recurrence(tr(q), tr(k), tr(v), tr(extra["beta"]))[0]
        return tr(o)
    mod = _fla_naive(variant)
    return mod.naive_recurrent_gated_delta_rule(q, k, v, extra["beta"], extra["log_decay"])[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_flash_linear_attention_naive(variant):
    torch = pytest.importorskip("torch")
    b, t, h, d, dv = 2, 21, 2, 32, 16
    q, k, v, extra = _inputs(variant, b, t, h, h, d, dv, seed=3)
    ct = np.random.default_rng(4).normal(size=(b, t, h, dv)).astype(np.float32)
    grads, (o, _) = _value_and_grads(
        q, k, v, extra, jnp.zeros((b, h, d, dv)), ct, variant=variant, impl="chunked", chunk=8,
        state_term=False,
    )  # fmt: skip
    ts = {
        name: torch.tensor(np.asarray(x), requires_grad=True)
        for name, x in dict(q=q, k=k, v=v, **extra).items()
        if not (variant == "retention" and name == "log_decay")  # fla's decays are built in
    }
    o_ref = _torch_ref(variant, ts["q"], ts["k"], ts["v"], ts, torch)
    (o_ref * torch.tensor(ct)).sum().backward()
    np.testing.assert_allclose(o, o_ref.detach().numpy(), **TOL)
    for name, g in zip("qkv", grads[:3], strict=True):
        np.testing.assert_allclose(g, ts[name].grad.numpy(), **TOL, err_msg=f"d{name}")
    for name in ("log_decay", "beta"):
        if name in ts:
            np.testing.assert_allclose(grads[3][name], ts[name].grad.numpy(), **TOL)


def test_normalized_elu_feature_map_matches_fla():
    """fla's ``normalize=True`` on φ(q), φ(k) (φ = elu + 1) == ours with feature_map="elu+1"."""
    torch = pytest.importorskip("torch")
    q, k, v, _ = _inputs("linear_attn", 1, 19, 2, 2, 16, 8, seed=5)
    o = linear_attention(q, k, v, feature_map="elu+1", normalize=True, chunk_size=8)
    phi = lambda x: torch.tensor(np.asarray(jax.nn.elu(x) + 1))  # noqa: E731
    ref = _fla_naive("linear_attn").naive_recurrent_linear_attn(
        phi(q), phi(k), torch.tensor(np.asarray(v)), normalize=True
    )[0]
    np.testing.assert_allclose(o, ref.numpy(), **TOL)


def test_katharopoulos_eq_2_to_4_elu_plus_one():
    """Katharopoulos et al. 2020 eq. 2-4, causal: V'_i = Σ_{j≤i} φ(Q_i)ᵀφ(K_j) V_j /
    Σ_{j≤i} φ(Q_i)ᵀφ(K_j) with φ(x) = elu(x) + 1 (eq. 7), written out row by row."""
    q, k, v, _ = _inputs("linear_attn", 1, 23, 1, 1, 8, 4, seed=6)
    phi = lambda x: np.where(x > 0, x + 1, np.exp(x))  # noqa: E731
    fq, fk, vv = phi(np.asarray(q[0, :, 0])), phi(np.asarray(k[0, :, 0])), np.asarray(v[0, :, 0])
    want = np.stack(
        [(fq[i] @ fk[: i + 1].T) @ vv[: i + 1] / (fq[i] @ fk[: i + 1].T).sum() for i in range(23)]
    )
    for impl in ("chunked", "naive", "recurrent"):
        kw = dict(feature_map="elu+1", normalize=True, implementation=impl, chunk_size=5)
        o = _fast(lambda *x: linear_attention(*x, **kw), q, k, v)  # noqa: B023
        np.testing.assert_allclose(o[0, :, 0], want, rtol=1e-5, atol=1e-6, err_msg=impl)


@pytest.mark.parametrize("variant", ["gla", "gated_delta_rule"])
def test_prefill_then_decode_steps_equal_whole_sequence(variant):
    """chunked prefill of 11 steps, then 6 one-token recurrent steps == chunked over all 17."""
    q, k, v, extra = _inputs(variant, 2, 17, 4, 2, 16, 8, seed=7)

    def run(q, k, v, extra):
        whole = linear_attention(q, k, v, variant=variant, chunk_size=4, **extra)
        part = lambda a, z: {n: x[:, a:z] for n, x in extra.items()}  # noqa: E731
        kw = dict(variant=variant, return_state=True)
        o, state = linear_attention(
            q[:, :11], k[:, :11], v[:, :11], chunk_size=4, **part(0, 11), **kw
        )
        outs = [o]
        for i in range(11, 17):
            o, state = linear_attention(
                *(x[:, i : i + 1] for x in (q, k, v)), implementation="recurrent",
                initial_state=state, **part(i, i + 1), **kw,
            )  # fmt: skip
            outs.append(o)
        return jnp.concatenate(outs, axis=1), whole

    stepped, whole = _fast(run, q, k, v, extra)
    np.testing.assert_allclose(stepped, whole, **TOL)


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v, extra = _inputs("simple_gla", 1, 40, 2, 1, 64, 32, seed=8)
    ref = _fast(
        lambda *x: linear_attention(*x, variant="simple_gla", implementation="naive", **extra),
        q,
        k,
        v,
    )
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    o = _fast(lambda *x: linear_attention(*x, variant="simple_gla", chunk_size=16, **extra), *bf)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(o.astype(jnp.float32), ref, atol=3e-2, rtol=3e-2)
    g = jax.grad(lambda q: linear_attention(q, *bf[1:], variant="simple_gla", **extra).sum())
    dq = _fast(g, bf[0])
    assert dq.dtype == jnp.bfloat16 and bool(jnp.isfinite(dq.astype(float)).all())


def test_bad_input_names_the_argument():
    q, k, v, extra = _inputs("gla", 1, 8, 4, 2, 16, 8)
    bad = [
        (dict(variant="gla"), "log_decay"),
        (dict(variant="gla", log_decay=extra["log_decay"][..., :3]), "log_decay"),
        (dict(variant="retention", log_decay=jnp.zeros(4)), "log_decay"),
        (dict(variant="simple_gla", log_decay=jnp.zeros((1, 8, 4))), "log_decay"),
        (dict(variant="linear_attn", log_decay=jnp.zeros((1, 8, 2))), "log_decay"),
        (dict(variant="delta_rule"), "beta"),
        (dict(variant="linear_attn", beta=jnp.zeros((1, 8, 2))), "beta"),
        (dict(variant="delta_rule", beta=jnp.zeros((1, 8, 4))), "beta"),
        (dict(variant="delta_rule", beta=jnp.zeros((1, 8, 2)), normalize=True), "normalize"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-4), "chunk_size"),
        (dict(chunk_size=2.0), "chunk_size"),
        (dict(implementation="flash"), "implementation"),
        (dict(variant="mamba"), "variant"),
        (dict(feature_map="softplus2"), "feature_map"),
        (dict(scale=-1.0), "scale"),
        (dict(initial_state=jnp.zeros((1, 2, 16, 8)), normalize=True), "initial_state"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            linear_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="must divide"):
        linear_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="k_BTKH"):
        linear_attention(q, k[:, :5], v)
