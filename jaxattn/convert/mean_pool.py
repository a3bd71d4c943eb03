"""MHA -> GQA by mean-pooling each group's key and value heads (Ainslie et al. 2023 §2.1).

The GQA paper's (and KDGQA's, arXiv 2408.08454) conversion of a multi-head checkpoint: kv head
g of the K new ones is the mean of the G = N / K original heads n in [g·G, (g + 1)·G), for the
key and value kernels and biases; q and o are kept. The result is an ``"mha"`` (GQA) or a
``"kdgqa"`` / ``"dgqa"`` layer (``kind=``), which with uniform groups runs exactly GQA.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxattn.layers import AttentionConfig, kind_config

__all__ = ["mean_pool_kv_heads"]


def mean_pool_kv_heads(
    config: AttentionConfig, params: dict, num_kv_heads: int, *, kind: str | None = None
) -> tuple[AttentionConfig, dict]:
    """Mean-pool an MHA layer's kv heads into ``num_kv_heads`` groups.

    Args:
      config: the layer's config, with K = N kv heads (and K_v = K, no SQA).
      params: ``jaxattn.convert.layer_params`` of the layer (k kernel [D, N, H], ...).
      num_kv_heads: K, dividing N.
      kind: the new layer's registered kind (default: the config's own).

    Returns:
      (new config with ``num_kv_heads=K``, new params: k / v kernels [D, K, H], biases [K, H]).

    Raises:
      ValueError: not an MHA layer, or K not dividing N (the field is named).
    """
    n = config.n_q
    if config.n_kv != n or config.n_v != n:
        raise ValueError(
            f"mean_pool_kv_heads: config has num_kv_heads={config.n_kv}, num_v_heads="
            f"{config.n_v}; an MHA layer has both equal to the query heads ({n})"
        )
    if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or n % num_kv_heads:
        raise ValueError(f"mean_pool_kv_heads: num_kv_heads={num_kv_heads} must divide N={n}")
    g = n // num_kv_heads
    out = {name: dict(entry) for name, entry in params.items()}
    for name in ("k", "v"):
        kernel = np.asarray(params[name]["kernel"])  # [D, N, H]
        d, _, h = kernel.shape
        out[name]["kernel"] = kernel.reshape(d, num_kv_heads, g, h).mean(2)
        if "bias" in params[name]:
            out[name]["bias"] = np.asarray(params[name]["bias"]).reshape(num_kv_heads, g, h).mean(1)
    cls = type(config) if kind is None else kind_config(kind)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    fields = {k: v for k, v in fields.items() if k in allowed}
    return cls(**fields | {"num_kv_heads": num_kv_heads, "num_v_heads": None}), out
