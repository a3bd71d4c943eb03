"""Factorised kernels: low-rank weight parameterisations of ``Linear`` for pretraining.

A ``Linear`` normally owns a dense kernel ``W [*in, *out]``. Its ``form`` slot can hold one of
these instead (``factorize(linear, name, ...)``, or by path with
``jaxattn.optim.parameterize``); the kernel parameter is then dropped and ``W`` exists only
as the product of the factors, viewed as the matrix ``W_mn`` (m = fan_in, n = fan_out):

* ``lowrank``  ``W = B_mr A_rn`` (pairs with ``jaxattn.optim.lowrank_refactor``);
  ``r (m + n)`` parameters.
* ``sltrain``  ``W = (alpha / r) B_mr A_rn + S``, S sparse with ``nnz = int(density m n)``
  entries on a support drawn uniformly at random from a PRNG key and then fixed (SLTrain, Han
  et al. 2024); only the values ``s [nnz]`` are parameters, the flat indices are a
  :class:`FixedSupport` variable rebuilt from the key (:func:`support_key`: a seed and the
  layer's path). The low-rank term carries LoRA's scale ``alpha / r`` as the authors' layer
  does (``x W_a W_b lora_alpha / r + x W_sp``; ``alpha`` defaults to their training script's
  32, :data:`SLTRAIN_ALPHA`). ``r (m + n) + nnz`` parameters.
* ``lrt``  ``W = B_mr A_rn`` from the truncated SVD of the layer's dense kernel,
  ``B = U_r diag(√s_r)``, ``A = diag(√s_r) Vᵀ_r`` (the Low-Rank Transformer of Greenformers,
  Winata et al. 2020: each dense weight becomes two thinner rank-r matrices); by
  Eckart–Young the discarded part has Frobenius norm ``sqrt(Σ_{i>r} s_i²)``, and at
  ``r = min(m, n)`` the form reproduces the dense kernel. ``r (m + n)`` parameters, the
  leaves of ``lowrank`` (so ``jaxattn.optim.lowrank_refactor`` serves it too).
* ``sst``  ``W = U_mk diag(s_k) Vᵀ_kn``, initialised from the SVD of the layer's dense
  initial kernel (Sparse Spectral Training, Zhao et al. 2024); ``k (m + n + 1)`` parameters.
  Which singular vectors train each step is the optimizer's part (``jaxattn.optim.sst``).

Every form offers ``matrix(dtype) -> W_mn`` (what ``Linear.effective_kernel`` /
``as_matrix`` return, so export, SVD and MLA absorption see the same weight) and
``project(x_NM) -> y_NN``, the forward pass through the factors: ``(x B) A`` costs
``N r (m + n)`` instead of forming ``W``; the sparse term is a gather + scatter-add over the
support when that is cheaper than a dense ``x S`` (``N nnz <= m n``, e.g. decoding), else
``S`` is scattered into a dense matrix.

Factor leaves are 2-D (``b [m, r]``, ``a [r, n]``, ``u [m, k]``, ``vt [k, n]``) whatever the
layer's ``in_shape`` / ``out_shape``; a flattened dim takes the logical axis of its first
input / output dim (row-major flattening keeps that axis' shards contiguous), the rank dim
``lora_rank``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._base import DTypeLike, cast, param, zeros_init

__all__ = [
    "SLTRAIN_ALPHA",
    "KernelForm",
    "LowRankKernel",
    "SVDLowRankKernel",
    "SparseLowRankKernel",
    "SpectralKernel",
    "FixedSupport",
    "register_form",
    "registered_forms",
    "factorize",
]


# the low-rank scale's numerator alpha (scale alpha / r): the default of the SLTrain authors'
# pretraining script (its --lora_alpha, used at LLaMA 60M; their larger configs pass 16 or 8)
SLTRAIN_ALPHA = 32.0


class FixedSupport(nnx.Variable):
    """The fixed flat indices of a sparse component (not a parameter: never trained)."""


class KernelForm(nnx.Module):
    """Base of the factorised kernels: a weight ``W_mn`` given by factors (module docstring)."""

    name = ""
    fan_in: int
    fan_out: int

    def matrix(self, dtype: DTypeLike | None = None) -> jax.Array:
        """``W`` as [fan_in, fan_out] (in ``dtype`` when given)."""
        raise NotImplementedError

    def project(self, x_NM: jax.Array, *, preferred_element_type=None) -> jax.Array:
        """``x_NM · W`` -> [N, fan_out] through the factors (in ``x``'s dtype)."""
        raise NotImplementedError

    def num_params(self) -> int:
        """Trainable parameter count (the formula of the module docstring)."""
        return sum(v.size for v in jax.tree.leaves(nnx.state(self, nnx.Param)))


def _dot(x, w, pet):
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=pet)


def _uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class LowRankKernel(KernelForm):
    """``W = B A``: ``b [m, r]`` and ``a [r, n]`` with i.i.d. normal entries of std
    ``(std / sqrt(r)) ** 0.5`` each, so that ``W`` has the dense init's entry std ``std``."""

    name = "lowrank"

    def __init__(self, fan_in, fan_out, rank, *, axes, rngs, std=0.02, param_dtype=jnp.float32):
        self.fan_in, self.fan_out, self.rank = fan_in, fan_out, rank
        init = nnx.initializers.normal(stddev=(std / math.sqrt(rank)) ** 0.5)
        self.b = param(rngs, (fan_in, rank), (axes[0], "lora_rank"), init=init, dtype=param_dtype)
        self.a = param(rngs, (rank, fan_out), ("lora_rank", axes[1]), init=init, dtype=param_dtype)

    def matrix(self, dtype=None):
        return cast(self.b[...] @ self.a[...], dtype)

    def project(self, x_NM, *, preferred_element_type=None):
        h_NR = _dot(x_NM, self.b[...], None)
        return _dot(h_NR, self.a[...], preferred_element_type)


class SVDLowRankKernel(LowRankKernel):
    """LRT's ``W = B A`` initialised from the top-``rank`` SVD of ``kernel_mn`` (the module
    docstring's ``lrt``): ``b = U_r diag(√s_r)`` [m, r], ``a = diag(√s_r) Vᵀ_r`` [r, n]."""

    name = "lrt"

    def __init__(self, kernel_mn, rank, *, axes, param_dtype=jnp.float32):
        self.fan_in, self.fan_out = kernel_mn.shape
        self.rank = rank
        u, s, vt = jnp.linalg.svd(kernel_mn.astype(jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[:rank])

        def named(x, names):  # the metadata jaxattn.layers.param gives (logical axis names)
            return nnx.Param(x.astype(param_dtype), out_sharding=names, eager_sharding=False)

        self.b = named(u[:, :rank] * root, (axes[0], "lora_rank"))
        self.a = named(root[:, None] * vt[:rank], ("lora_rank", axes[1]))


class SparseLowRankKernel(KernelForm):
    """SLTrain's ``W = (alpha / r) B A + S``. As the authors' layer: the input-side factor
    ``b [m, r]`` and the sparse values are uniform in ``±1/sqrt(m)``, the output-side factor
    ``a [r, n]`` is zero (so ``W = S`` at birth), the low-rank term is scaled by
    ``scale = alpha / r`` (a constant, not trained); the support is ``nnz`` distinct flat
    indices of ``[m, n]``, the first ``nnz`` of a random permutation under ``support_key``,
    sorted."""

    name = "sltrain"

    def __init__(
        self, fan_in, fan_out, rank, *, density, axes, rngs, support_key=None,
        alpha=SLTRAIN_ALPHA, param_dtype=jnp.float32,
    ):  # fmt: skip
        self.fan_in, self.fan_out, self.rank = fan_in, fan_out, rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.density = float(density)
        nnz = int(self.density * fan_in * fan_out)
        self.nnz = nnz
        bound = 1.0 / math.sqrt(fan_in)
        b_axes, a_axes = (axes[0], "lora_rank"), ("lora_rank", axes[1])
        self.b = param(rngs, (fan_in, rank), b_axes, init=_uniform(bound), dtype=param_dtype)
        self.a = param(rngs, (rank, fan_out), a_axes, init=zeros_init, dtype=param_dtype)
        self.s = param(rngs, (nnz,), (None,), init=_uniform(bound), dtype=param_dtype)
        key = rngs.params() if support_key is None else support_key
        self.support = FixedSupport(sparse_support(key, fan_in, fan_out, nnz))

    def sparse_matrix(self, dtype=None) -> jax.Array:
        """``S`` as a dense [m, n] matrix (zero off the support)."""
        s = self.s[...]
        flat = jnp.zeros((self.fan_in * self.fan_out,), s.dtype).at[self.support[...]].set(s)
        return cast(flat.reshape(self.fan_in, self.fan_out), dtype)

    def matrix(self, dtype=None):
        return cast(self.scale * (self.b[...] @ self.a[...]) + self.sparse_matrix(), dtype)

    def project(self, x_NM, *, preferred_element_type=None):
        # the scale goes on the input-side factor in the parameter dtype, as the authors'
        # layer scales its lora_A: [m, r] multiplies, and x's dtype never rounds alpha / r
        h_NR = _dot(x_NM, self.b[...] * self.scale, None)
        y = _dot(h_NR, self.a[...], preferred_element_type)
        if x_NM.shape[0] * self.nnz <= self.fan_in * self.fan_out:  # gather: N nnz work
            idx = self.support[...]
            rows, cols = idx // self.fan_out, idx % self.fan_out
            terms_NZ = x_NM[:, rows] * self.s[...].astype(x_NM.dtype)
            sparse = jnp.zeros((x_NM.shape[0], self.fan_out), y.dtype)
            return y + sparse.at[:, cols].add(terms_NZ.astype(y.dtype))
        return y + _dot(x_NM, self.sparse_matrix(), preferred_element_type).astype(y.dtype)


def sparse_support(key: jax.Array, m: int, n: int, nnz: int) -> jax.Array:
    """``nnz`` distinct flat indices into ``[m, n]``, uniform at random under ``key``, sorted
    (int32 [nnz]). The same key always gives the same support."""
    return jnp.sort(jax.random.permutation(key, m * n)[:nnz]).astype(jnp.int32)


class SpectralKernel(KernelForm):
    """SST's ``W = U diag(s) Vᵀ``: the top-``rank`` SVD triplets of ``kernel_mn`` (the layer's
    dense initial kernel), so that at ``rank = min(m, n)`` the form reproduces it."""

    name = "sst"

    def __init__(self, kernel_mn, rank, *, axes, param_dtype=jnp.float32):
        self.fan_in, self.fan_out = kernel_mn.shape
        self.rank = rank
        u, s, vt = jnp.linalg.svd(kernel_mn.astype(jnp.float32), full_matrices=False)

        def named(x, names):  # the metadata jaxattn.layers.param gives (logical axis names)
            return nnx.Param(x.astype(param_dtype), out_sharding=names, eager_sharding=False)

        self.u = named(u[:, :rank], (axes[0], "lora_rank"))
        self.s = named(s[:rank], ("lora_rank",))
        self.vt = named(vt[:rank], ("lora_rank", axes[1]))

    def matrix(self, dtype=None):
        return cast((self.u[...] * self.s[...]) @ self.vt[...], dtype)

    def project(self, x_NM, *, preferred_element_type=None):
        h_NK = _dot(x_NM, self.u[...], None) * self.s[...].astype(x_NM.dtype)
        return _dot(h_NK, self.vt[...], preferred_element_type)


# name -> builder(linear, *, rank, density, alpha, rngs, path, seed) -> KernelForm
_FORMS: dict[str, Callable] = {}


def register_form(name: str, build: Callable) -> None:
    """Register ``build(linear, *, rank, density, alpha, rngs, path, seed) -> KernelForm`` as
    ``name`` (``alpha``: a scale numerator, for forms that scale a low-rank term; ``seed``: an
    int or None, for a form's own fixed random structure)."""
    _FORMS[name] = build


def registered_forms() -> list[str]:
    """The names :func:`factorize` accepts."""
    return sorted(_FORMS)


def _axes(linear) -> tuple:
    names = tuple(linear.kernel.get_metadata().get("out_sharding") or ())
    if not names:
        return (None, None)
    n_in = len(linear.in_shape)
    return (names[0], names[n_in])


register_form(
    "lowrank",
    lambda lin, *, rank, density, alpha, rngs, path, seed: LowRankKernel(
        lin.fan_in, lin.fan_out, rank, axes=_axes(lin), rngs=rngs, param_dtype=lin.kernel.dtype
    ),
)


def support_key(seed: int, path: str) -> jax.Array:
    """The key of the sparse support of the projection at ``path``: ``seed`` folded with a
    hash of the path, so the support is a function of the model config alone (not of the
    run's parameter RNG: a model rebuilt to sample or fine-tune gets the same supports)."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _sltrain(lin, *, rank, density, alpha, rngs, path, seed):
    key = None if seed is None else support_key(seed, path)
    return SparseLowRankKernel(
        lin.fan_in, lin.fan_out, rank, density=density, axes=_axes(lin), rngs=rngs,
        support_key=key, alpha=alpha, param_dtype=lin.kernel.dtype,
    )  # fmt: skip


register_form("sltrain", _sltrain)


def _from_dense(form_cls):
    """A builder of ``form_cls(kernel_mn, rank, ...)`` from the layer's own dense kernel."""

    def build(lin, *, rank, density, alpha, rngs, path, seed):
        kernel_mn = lin.kernel[...].reshape(lin.fan_in, lin.fan_out)
        return form_cls(kernel_mn, rank, axes=_axes(lin), param_dtype=lin.kernel.dtype)

    return build


register_form("lrt", _from_dense(SVDLowRankKernel))
register_form("sst", _from_dense(SpectralKernel))


def factorize(
    linear, form: str, *, rank: int | None, density: float = 0.0, rngs=None, path: str = "",
    support_seed: int | None = None, alpha: float = SLTRAIN_ALPHA,
):  # fmt: skip
    """Replace ``linear``'s dense kernel by the factorised ``form`` (in place; returns it).

    Args:
      linear: a ``jaxattn.layers.Linear`` with its own (untied) dense kernel and no adapter.
      form: a registered name (``lowrank``, ``sltrain``, ``lrt``, ``sst``).
      rank: r (``lowrank``, ``sltrain``, ``lrt``) or the kept spectrum k (``sst``), in
        ``[1, min(fan_in, fan_out)]``; None: ``min(fan_in, fan_out)`` for ``sst`` / ``lrt``.
      density: ``sltrain``'s fraction of non-zero entries of S, in (0, 1).
      rngs: ``nnx.Rngs`` for the new factors (``sst`` / ``lrt`` read the dense kernel instead).
      path: the layer's module path, for error messages (and ``sltrain``'s support key).
      support_seed: ``sltrain``: the support's key is :func:`support_key` (seed, path); None:
        drawn from ``rngs``.
      alpha: ``sltrain``: the low-rank term's scale is ``alpha / rank`` (> 0, finite).

    Raises:
      ValueError: an unknown form, a rank outside its range, a density giving no entry, a
        tied / shared kernel or an attached adapter (naming the field and the layer).
    """
    where = f"the projection at {path!r}" if path else "the projection"
    if form not in _FORMS:
        raise ValueError(f"parameterization={form!r} is not one of {registered_forms()}")
    if linear.form is not None:
        raise ValueError(f"{where} is already factorised ({linear.form.name!r})")
    if linear.transposed or linear.kernel is None:
        raise ValueError(
            f"parameterization={form!r} cannot serve {where}: its kernel is shared (a tied "
            "head over the embedding table); exclude it from the parameterised paths"
        )
    if linear.adapter is not None:
        raise ValueError(f"parameterization={form!r}: {where} has an adapter; factorise first")
    m, n = linear.fan_in, linear.fan_out
    from_svd = form in ("sst", "lrt")  # factors read from the dense kernel, no rngs
    if rank is None and from_svd:
        rank = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(
            f"parameterization={form!r}: rank={rank!r} for {where} (matrix [{m}, {n}]) must be "
            f"an int in [1, min(m, n) = {min(m, n)}]"
        )
    if form == "sltrain":
        if not (isinstance(density, float | int) and 0.0 < density < 1.0):
            raise ValueError(f"parameterization='sltrain': density={density!r} must be in (0, 1)")
        if (
            isinstance(alpha, bool) or not isinstance(alpha, float | int)
            or not math.isfinite(alpha) or alpha <= 0
        ):  # fmt: skip
            raise ValueError(f"parameterization='sltrain': alpha={alpha!r} must be a float > 0")
        if int(density * m * n) < 1:
            raise ValueError(
                f"parameterization='sltrain': density={density} gives no sparse entry for "
                f"{where} ([{m}, {n}] has {m * n} entries); raise the density"
            )
    if not from_svd and rngs is None:
        raise ValueError(f"parameterization={form!r} needs rngs for the new factors of {where}")
    built = _FORMS[form](
        linear, rank=rank, density=density, alpha=alpha, rngs=rngs, path=path, seed=support_seed
    )
    linear.form = built
    linear.kernel = None
    return built
