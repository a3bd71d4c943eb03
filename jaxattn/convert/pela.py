"""PELA (Guo, Wang & Kankanhalli 2024, "PELA: Learning Parameter-Efficient Models with Low-Rank
Approximation", PAPERS.md §9): compress a pretrained model by low-rank approximation, then
improve the low-rank model in an intermediate pre-training stage with feature distillation and
weight-perturbation regularisation; only the low-rank model is updated, the backbone is frozen.

On a stack of linear layers ``h_l = φ(h_{l−1} W_l)`` (w [I, O], ``Linear.as_matrix``; φ a fixed
activation, the last layer linear):

* **Initialisation** (:func:`pela_init`): each W_l becomes its rank-r truncated SVD
  ``A_l B_l``, A = U_r Σ_r^(1/2), B = Σ_r^(1/2) V_rᵀ (:func:`~jaxattn.convert.lord.lord`).
* **Feature distillation:** ``L_fd = Σ_l mean_tokens ‖h_l^teacher − h_l^student‖²``, the
  student's token features aligned with the frozen teacher's layer by layer.
* **Weight perturbation regularisation:** ``L_wp = Σ_l ‖W_l − A_l B_l‖_F²``, which keeps each
  recovered low-rank matrix close to the original weight it replaces.
* Objective ``L = L_task + α L_fd + β L_wp`` (:func:`pela_loss`), minimised over the factors
  only (:func:`pela_train`); the teacher's weights enter as constants (``stop_gradient``) and
  come back unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.convert._fit import adam_fit
from jaxattn.convert.compensation import _matrix
from jaxattn.convert.lord import lord

__all__ = ["pela_init", "pela_loss", "pela_train"]


def pela_init(weights, *, rank) -> tuple[list, list]:
    """Truncated-SVD factors of each weight (PELA's low-rank initialisation).

    Args:
      weights: the teacher's matrices [I_l, O_l] (consecutive: O_l = I_{l+1}).
      rank: r for every layer (int) or one per layer, each in [1, min(I_l, O_l)].

    Returns:
      (factors [(A_l [I_l, r_l], B_l [r_l, O_l])], infos [lord's info per layer]).
    """
    ws = [_matrix(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if not ws:
        raise ValueError("weights must hold at least one matrix")
    for i in range(len(ws) - 1):
        if ws[i].shape[1] != ws[i + 1].shape[0]:
            raise ValueError(f"weights[{i}] {ws[i].shape} does not feed weights[{i + 1}] "
                             f"{ws[i + 1].shape}")  # fmt: skip
    ranks = [rank] * len(ws) if isinstance(rank, (int, np.integer)) else list(rank)
    if len(ranks) != len(ws):
        raise ValueError(f"rank gives {len(ranks)} ranks for {len(ws)} weights")
    factors, infos = [], []
    for i, (w, r) in enumerate(zip(ws, ranks)):
        try:
            a, b, info = lord(w, rank=r)
        except ValueError as e:
            raise ValueError(f"pela_init: weights[{i}]: {e}") from None
        factors.append((a, b))
        infos.append(info)
    return factors, infos


def _features(mats, x, act):
    hs = []
    for i, m in enumerate(mats):
        x = x @ m
        if i < len(mats) - 1:
            x = act(x)
        hs.append(x)
    return hs


def pela_loss(factors, weights, x_NI, *, alpha: float = 1.0, beta: float = 0.0, act=jax.nn.gelu,
              task=None):  # fmt: skip
    """PELA's objective on the factors (module docstring).

    Args:
      factors: [(A_l, B_l)], the student (trained).
      weights: [W_l], the teacher (frozen: gradients stop here).
      x_NI: input token features [N, I_0].
      alpha, beta: the weights of feature distillation and weight perturbation, >= 0.
      act: the activation between layers.
      task: optional ``task(student_output [N, O_L]) -> scalar``, the task loss.

    Returns:
      (total, {"task", "distill", "perturb"}) scalars.
    """
    if not (alpha >= 0 and beta >= 0):
        raise ValueError(f"alpha={alpha} and beta={beta} must be >= 0")
    teacher = [jax.lax.stop_gradient(jnp.asarray(w, jnp.float32)) for w in weights]
    student = [jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32) for a, b in factors]
    x = jnp.asarray(x_NI, jnp.float32)
    h_t, h_s = _features(teacher, x, act), _features(student, x, act)
    distill = sum(jnp.mean(jnp.sum((t - s) ** 2, -1)) for t, s in zip(h_t, h_s))
    perturb = sum(jnp.sum((w - s) ** 2) for w, s in zip(teacher, student))
    task_loss = task(h_s[-1]) if task is not None else jnp.float32(0.0)
    total = task_loss + alpha * distill + beta * perturb
    return total, {"task": task_loss, "distill": distill, "perturb": perturb}


def pela_train(factors, weights, x_NI, *, steps: int, lr: float, alpha: float = 1.0,
               beta: float = 0.0, act=jax.nn.gelu, task=None):  # fmt: skip
    """Adam on :func:`pela_loss` over the factors only, ``steps`` jitted steps.

    Returns:
      (factors float64, {"loss": [steps + 1] total before each step and at the end,
      "distill", "perturb": the final terms}).
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"steps={steps} must be >= 1 and lr={lr} > 0")
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), [tuple(f) for f in factors])

    def loss(p):
        return pela_loss(p, weights, x_NI, alpha=alpha, beta=beta, act=act, task=task)[0]

    p, hist = adam_fit(loss, p, lr=lr, steps=steps)
    _, terms = pela_loss(p, weights, x_NI, alpha=alpha, beta=beta, act=act, task=task)
    out = [tuple(np.asarray(m, np.float64) for m in f) for f in p]
    return out, {"loss": np.asarray(hist), **{k: float(v) for k, v in terms.items()}}
