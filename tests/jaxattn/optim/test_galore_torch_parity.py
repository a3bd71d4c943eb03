"""jaxattn.optim.galore / fira against the reference PyTorch optimizers (CPU, fp32).

galore-torch 1.0 (``GaLoreAdamW``) and fira 1.0.2 (``FiraAdamW``) get the same weights, the
same gradients and the same hyper-parameters for 5 steps with T = 2 (projector refreshes at
steps 0, 2 and 4). Their SVD's sign is fixed to ours (each projector vector's largest-magnitude
entry positive) by wrapping their ``get_orthogonal_matrix``.
"""

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
galore_torch = pytest.importorskip("galore_torch")
fira_pkg = pytest.importorskip("fira")

from galore_torch.galore_projector import GaLoreProjector  # noqa: E402

from jaxattn import optim  # noqa: E402

SHAPES = {"tall": (40, 24), "wide": (24, 40), "square": (32, 32)}
RANK, GAP, STEPS, LR, SCALE = 6, 2, 5, 1e-2, 0.25
GRAD_SCALE = 1e-2


def _fix_cols(a):
    idx = a.abs().argmax(dim=0, keepdim=True)
    return a * torch.sign(torch.gather(a, 0, idx))


def _fix_rows(a):
    idx = a.abs().argmax(dim=1, keepdim=True)
    return a * torch.sign(torch.gather(a, 1, idx))


def _signed(orig):
    def get_orthogonal_matrix(self, weights, rank, type):
        out = orig(self, weights, rank, type)
        if type == "left":
            return _fix_cols(out)
        if type == "right":
            return _fix_rows(out)
        return [_fix_cols(out[0]), _fix_rows(out[1])]

    return get_orthogonal_matrix


def _grad(rng, shape):
    """A gradient with a decaying spectrum (s_i = 0.01 * 0.8^i): low-rank-ish like real ones,
    and with singular gaps wide enough that fp32 SVDs (ours, torch's) agree to ~1e-7."""
    if len(shape) == 1:
        return (GRAD_SCALE * rng.standard_normal(shape)).astype(np.float32)
    k = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    return ((u * (GRAD_SCALE * 0.8 ** np.arange(k))) @ v.T).astype(np.float32)


def _problem():
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    params["bias"] = rng.standard_normal(40).astype(np.float32)
    grads = [{k: _grad(rng, v.shape) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


def _run_torch(make_opt, params, grads):
    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = make_opt([tparams[k] for k in SHAPES], [tparams["bias"]])
    for g in grads:
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k])
        opt.step()
    return {k: p.detach().numpy() for k, p in tparams.items()}


def _run_jax(tx, params, grads):
    params = jax.tree.map(np.asarray, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for g in grads:
        params, state = step(params, state, g)
    return jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_galore_matches_galore_torch(proj_type, monkeypatch):
    monkeypatch.setattr(
        GaLoreProjector, "get_orthogonal_matrix", _signed(GaLoreProjector.get_orthogonal_matrix)
    )
    params, grads = _problem()

    def make_opt(mats, regular):
        group = {
            "params": mats,
            "rank": RANK,
            "update_proj_gap": GAP,
            "scale": SCALE,
            "proj_type": proj_type,
        }
        return galore_torch.GaLoreAdamW(
            [{"params": regular}, group], lr=LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
            no_deprecation_warning=True,
        )  # fmt: skip

    want = _run_torch(make_opt, params, grads)
    tx = optax.chain(
        optim.galore(
            optim.scale_by_adam_galore_torch(0.9, 0.999, 1e-6),
            rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type=proj_type,
        ),
        optax.scale(-LR),
    )  # fmt: skip
    got = _run_jax(tx, params, grads)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)
    moved = max(np.abs(got[k] - params[k]).max() for k in SHAPES)
    assert moved > 1e-3  # the comparison is not between two unchanged weights


@pytest.mark.parametrize("proj_type", ["std", "left", "right"])
def test_fira_matches_official_fira(proj_type, monkeypatch):
    from fira.gradient_projection import GradientProjector

    monkeypatch.setattr(
        GradientProjector, "get_orthogonal_matrix", _signed(GradientProjector.get_orthogonal_matrix)
    )
    params, grads = _problem()
    # a gradient spike at step 3 so that the norm-growth limiter engages
    grads[3] = {k: 50.0 * v for k, v in grads[3].items()}

    def make_opt(mats, regular):
        group = {
            "params": mats,
            "rank": RANK,
            "update_proj_gap": GAP,
            "alpha": 1.0,
            "proj_type": proj_type,
        }
        return fira_pkg.FiraAdamW(
            [{"params": regular}, group], lr=LR, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
            correct_bias=False, no_deprecation_warning=True,
        )  # fmt: skip

    want = _run_torch(make_opt, params, grads)
    tx = optax.chain(
        optim.fira(
            optim.scale_by_adam_galore_torch(0.9, 0.999, 1e-6, correct_bias=False),
            rank=RANK, update_proj_gap=GAP, scale=1.0, gamma=1.01, proj_type=proj_type,
        ),
        optax.scale(-LR),
    )  # fmt: skip
    got = _run_jax(tx, params, grads)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)
