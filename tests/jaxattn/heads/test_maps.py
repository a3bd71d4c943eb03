"""WAAD / FAI on synthetic maps (identity, uniform causal, banded) against hand-computed values;
ACT calibration (rows still sum to 1, mass leaves the sinks, other heads unchanged) on maps
and through the pattern hook of a model; segment mass (ICR)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hooks_testlib import model_of, run, tokens

from jaxattn import heads
from jaxattn.heads import maps

T = 6


def _maps():
    eye = np.eye(T)
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    band = np.zeros((T, T))  # previous token (row 0: itself)
    band[0, 0] = 1.0
    band[np.arange(1, T), np.arange(T - 1)] = 1.0
    return np.stack([eye, uniform, band])[None]  # [1, 3 "heads", T, T]


def test_waad_by_hand():
    w = np.asarray(maps.waad(_maps(), window=3))[0]
    np.testing.assert_allclose(w[0], 0.0)  # identity: distance 0
    # uniform causal row t: mean of min(d, 3) for d = 0..t
    want = [np.mean([min(d, 3) for d in range(t + 1)]) for t in range(T)]
    np.testing.assert_allclose(w[1], want, rtol=1e-6)
    np.testing.assert_allclose(w[2], [0, 1, 1, 1, 1, 1])  # banded: distance 1 after row 0
    np.testing.assert_allclose(
        np.asarray(maps.waad(_maps(), window=1))[0, 1],
        [0] + [t / (t + 1) for t in range(1, T)],
        rtol=1e-6,
    )


def test_fai_by_hand():
    f = np.asarray(maps.fai(_maps()))[0]
    np.testing.assert_allclose(f[0], 0.0)  # identity: no later row looks back
    want = [np.mean([1 / (t + 1) for t in range(s + 1, T)]) for s in range(T - 1)] + [0.0]
    np.testing.assert_allclose(f[1], want, rtol=1e-6)
    # banded: key s gets weight 1 from row s + 1 only, averaged over T - 1 - s later rows
    np.testing.assert_allclose(f[2], [1 / (T - 1 - s) for s in range(T - 1)] + [0.0], rtol=1e-6)


def test_segment_mass():
    p = _maps()
    seg = np.zeros((1, 2, T), bool)
    seg[0, 0, :2] = True
    seg[0, 1, 2:] = True
    m = np.asarray(maps.segment_mass(p, seg))
    np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(m[0, 1, 3], [2 / 4, 2 / 4])


def _sinky(seed=0):
    """Random causal maps [2, 4, T, T] with key 3 a strong hidden sink in every head."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 4, T, T))
    logits[..., 3] += 4.0
    mask = np.tril(np.ones((T, T), bool))
    return np.asarray(jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), -1))


def test_act_rows_sum_to_one_mass_leaves_sinks_other_heads_unchanged():
    p = _sinky()
    sinks = maps.find_sinks(p, threshold=0.3)
    assert np.asarray(sinks)[..., 3].all() and not np.asarray(sinks)[..., 0].any()
    calibrated_heads = np.array([True, False, True, False])
    q = np.asarray(maps.calibrate_sinks(p, sinks, calibrated_heads, beta=0.4))
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(q[:, ~calibrated_heads], p[:, ~calibrated_heads])
    rows = slice(4, None)  # rows that see the sink and another key
    np.testing.assert_allclose(
        q[:, calibrated_heads, rows, 3], 0.4 * p[:, calibrated_heads, rows, 3], rtol=1e-5
    )
    sink = np.broadcast_to(np.asarray(sinks)[:, :, None], p.shape)[:, calibrated_heads]
    qc, pc = q[:, calibrated_heads], p[:, calibrated_heads]
    assert (qc[sink] <= pc[sink] + 1e-6).all() and (qc[~sink] >= pc[~sink] - 1e-6).all()
    assert (q[np.tril(np.ones((T, T), bool))[None, None].repeat(2, 0).repeat(4, 1) == 0] == 0).all()


def test_act_through_the_pattern_hook():
    model = model_of("mha")
    toks = tokens(2, 8)
    hook = maps.act_hook(0, [1, 3], 4, threshold=0.2, beta=0.5)
    _, caps = run(model, toks, [hook, heads.Capture("blocks.0.attn.pattern")])
    _, base = run(model, toks, [heads.Capture("blocks.0.attn.pattern")])
    p, p0 = np.asarray(caps["blocks.0.attn.pattern"]), np.asarray(base["blocks.0.attn.pattern"])
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p[:, [0, 2]], p0[:, [0, 2]], atol=1e-6)
    sinks = np.asarray(maps.find_sinks(p0, 0.2))
    want = np.asarray(maps.calibrate_sinks(p0, sinks, np.array([0, 1, 0, 1], bool), 0.5))
    np.testing.assert_allclose(p, want, atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: maps.waad(np.ones((2, 2)), 2), r"\[B, N, T, S\]"),
        (lambda: maps.waad(_maps(), 0), "window=0"),
        (lambda: maps.fai(np.ones((1, 1, 2, 3))), "square"),
        (lambda: maps.calibrate_sinks(_maps(), np.zeros((1, 3, T), bool), [1, 1, 1], 2.0), "beta"),
        (lambda: maps.act_hook(0, [5], 4, threshold=0.1), "out of range"),
        (lambda: maps.segment_mass(_maps(), np.zeros((1, 2, 3), bool)), "segments_BdS"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
