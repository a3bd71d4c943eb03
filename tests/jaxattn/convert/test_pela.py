"""PELA (PAPERS.md §9): low-rank model + feature distillation + weight perturbation regulariser.

Faithful tests: the low-rank initialisation equals the truncated SVD of each backbone weight
(Eckart–Young error); the distillation loss is 0 at full rank (and so is the perturbation
term); the frozen teacher's parameters never change and get no gradient. Beyond that: training
lowers the distillation loss from the SVD start at a low rank, the rank stays r, and a large
perturbation weight β keeps A B closer to W than β = 0 does.
"""

import jax
import numpy as np
import pytest

from jaxattn import convert as C

RNG = np.random.default_rng(0)
N, DIMS = 64, (12, 16, 8)
WS = [RNG.normal(size=(i, o)) / np.sqrt(i) for i, o in zip(DIMS[:-1], DIMS[1:])]
X = RNG.normal(size=(N, DIMS[0]))


@pytest.mark.parametrize("rank", [2, 5])
def test_init_is_truncated_svd(rank):
    factors, infos = C.pela_init(WS, rank=rank)
    for w, (a, b), info in zip(WS, factors, infos):
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        assert a.shape == (w.shape[0], rank) and b.shape == (rank, w.shape[1])
        np.testing.assert_allclose(a @ b, (u[:, :rank] * s[:rank]) @ vt[:rank], atol=1e-10)
        np.testing.assert_allclose(info["error"], np.sqrt((s[rank:] ** 2).sum()), rtol=1e-9)


def test_full_rank_losses_zero():
    factors, _ = C.pela_init(WS, rank=[min(w.shape) for w in WS])
    total, terms = C.pela_loss(factors, WS, X, alpha=1.0, beta=1.0)
    assert float(terms["distill"]) < 1e-9 and float(terms["perturb"]) < 1e-9
    assert float(total) < 1e-9
    # at a low rank both terms are positive
    _, terms = C.pela_loss(C.pela_init(WS, rank=2)[0], WS, X, alpha=1.0, beta=1.0)
    assert float(terms["distill"]) > 1e-2 and float(terms["perturb"]) > 1e-2


def test_teacher_frozen_and_training_distills():
    teacher = [w.copy() for w in WS]
    factors, _ = C.pela_init(WS, rank=3)
    # the teacher gets no gradient: the objective's derivative w.r.t. W is zero
    g = jax.grad(lambda ws: C.pela_loss(factors, ws, X, alpha=1.0, beta=1.0)[0])(WS)
    assert all(np.abs(np.asarray(gi)).max() == 0 for gi in g)
    out, info = C.pela_train(factors, WS, X, steps=80, lr=1e-2, alpha=1.0, beta=0.0)
    for w, t in zip(WS, teacher):
        np.testing.assert_array_equal(w, t)  # never changed
    loss = info["loss"]
    assert loss[-1] < 0.8 * loss[0]  # distillation improves on the SVD start
    assert [a.shape[1] for a, _ in out] == [3, 3]
    # a large perturbation weight keeps the recovered matrices near the originals
    _, info_b = C.pela_train(factors, WS, X, steps=80, lr=1e-2, alpha=1.0, beta=10.0)
    assert info_b["perturb"] < info["perturb"]


def test_bad_input():
    with pytest.raises(ValueError, match="rank"):
        C.pela_init(WS, rank=13)
    with pytest.raises(ValueError, match="does not feed"):
        C.pela_init([WS[1], WS[0]], rank=2)
    with pytest.raises(ValueError, match="3 ranks for 2"):
        C.pela_init(WS, rank=[1, 2, 3])
    with pytest.raises(ValueError, match="alpha"):
        C.pela_loss(C.pela_init(WS, rank=2)[0], WS, X, alpha=-1.0)
    with pytest.raises(ValueError, match="steps"):
        C.pela_train(C.pela_init(WS, rank=2)[0], WS, X, steps=0, lr=1e-2)
