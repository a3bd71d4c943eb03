"""Low-rank weight parameterisations for pretraining from scratch, chosen by path.

``parameterize(model, "sltrain", rank=16, paths=r"/(attn|mlp)/", rngs=...)`` puts a
factorised kernel (``jaxattn.layers.factorize``: ``lowrank`` B·A, ``sltrain`` (alpha/r) B·A + S,
``sst`` U·diag(s)·Vᵀ) in the ``form`` slot of every ``Linear`` whose module path
(``layers/0/attn/q``) the regex ``paths`` is found in. Parameters then live at
``<path>/form/{b,a}``, ``<path>/form/{b,a,s}`` or ``<path>/form/{u,s,vt}``; the training
procedures that go with them are optimizer transforms over those leaves
(``jaxattn.optim.lowrank_refactor`` on ``b``/``a``, ``jaxattn.optim.sst`` on ``u``/``s``/``vt``).

:func:`form_param_count` gives the parameter count of one factorised ``[m, n]`` matrix from
the formulas (``r (m + n)``, ``r (m + n) + int(density m n)``, ``k (m + n + 1)``).
"""

from __future__ import annotations

import difflib
import re

from flax import nnx

from jaxattn.layers import factorize, registered_forms
from jaxattn.layers._factorized import SLTRAIN_ALPHA

__all__ = ["parameterize", "form_param_count", "DEFAULT_PATHS", "SLTRAIN_ALPHA"]

# attention and MLP projections of a DecoderLM; not the embedding table nor the LM head
DEFAULT_PATHS = r"^layers/\d+/(attn|mlp)/"


def form_param_count(form: str, m: int, n: int, *, rank: int, density: float = 0.0) -> int:
    """Parameters of an ``[m, n]`` weight in ``form`` (``dense``: ``m n``)."""
    counts = {
        "dense": lambda: m * n,
        "lowrank": lambda: rank * (m + n),
        "sltrain": lambda: rank * (m + n) + int(density * m * n),
        "sst": lambda: rank * (m + n + 1),
        "lrt": lambda: rank * (m + n),
    }
    if form not in counts:
        raise ValueError(f"form={form!r} is not one of {sorted(counts)}")
    return counts[form]()


def parameterize(
    model: nnx.Module,
    form: str,
    *,
    rank: int | None,
    paths: str = DEFAULT_PATHS,
    density: float = 0.03,
    rngs: nnx.Rngs | None = None,
    support_seed: int | None = None,
    alpha: float = SLTRAIN_ALPHA,
) -> list[str]:
    """Factorise every ``Linear`` of ``model`` whose module path matches ``paths`` (in place).

    Args:
      model: an NNX module holding ``jaxattn.layers.Linear`` projections.
      form: ``lowrank``, ``sltrain``, ``sst`` (or any ``jaxattn.layers.register_form`` name).
      rank: r of ``lowrank`` / ``sltrain``, the kept spectrum k of ``sst`` (None: full).
      paths: regex searched in each projection's module path.
      density: ``sltrain``'s non-zero fraction of S.
      rngs: RNGs of the new factors (and of the sparse supports, without ``support_seed``).
      support_seed: ``sltrain``: each support's key from this seed and the layer's path
        (``jaxattn.layers._factorized.support_key``), independent of ``rngs``.
      alpha: ``sltrain``: the low-rank term is scaled by ``alpha / rank`` (the authors'
        ``lora_alpha``; default 32).

    Returns:
      The factorised paths, in model order.

    Raises:
      ValueError: an unknown form, a bad regex, a regex matching no projection, or a layer
        the form cannot serve (naming the field and the layer's path).
    """
    from jaxattn.lowrank import linear_paths

    if form not in registered_forms():
        close = difflib.get_close_matches(str(form), registered_forms(), n=2)
        raise ValueError(
            f"parameterization={form!r} is not one of {registered_forms()}"
            + (f"; did you mean {close}?" if close else "")
        )
    try:
        regex = re.compile(paths)
    except re.error as err:
        raise ValueError(f"parameterization_paths={paths!r} is not a regex: {err}") from None
    found = linear_paths(model)
    chosen = [p for p in found if regex.search(p)]
    if not chosen:
        raise ValueError(
            f"parameterization_paths={paths!r} matches no projection of {type(model).__name__}; "
            f"projections look like {list(found)[:6]}"
        )
    for path in chosen:
        factorize(found[path], form, rank=rank, density=density, rngs=rngs, path=path,
                  support_seed=support_seed, alpha=alpha)  # fmt: skip
    return chosen
