"""Platform tuning the training entry points apply before JAX starts its backends.

XLA:CPU (jax 0.10) hands every dot to YNNPACK by default. For the training step's fp32
matmuls ([2048, 256] x [256, 768] and their transposed gradient forms) XLA's own Eigen dot
is faster: measured on a 2-core Sapphire Rapids, one thread, 66-88 GFLOP/s with YNNPACK vs
96-108 GFLOP/s with Eigen, and 10-25% less wall time for the whole train step of
``mla-tiny-default``. :func:`configure_cpu` turns YNNPACK's dot fusions off (its
elementwise fusions stay) through ``XLA_FLAGS``; it only affects the CPU backend, leaves any
``xla_cpu_experimental_ynn_fusion_type`` the user set alone, and does nothing once JAX's
backends are initialised (flags are read once, at start-up). It also does nothing on hosts
with a TPU/GPU plugin or an unverified jaxlib (see ``flags_apply``): XLA aborts on unknown
flags.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["CPU_XLA_FLAGS", "configure_cpu", "flags_apply"]

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",)


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public query for this

    return xla_bridge.backends_are_initialized()


# XLA aborts on flags it does not know, so they are only added where they were verified: the
# jaxlib line they exist in, on a host whose JAX has no accelerator plugin (a TPU pod or GPU
# host must never pay for a CPU tuning with a crash at start-up).
_VERIFIED_JAXLIB = ("0.10.",)
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def flags_apply() -> bool:
    """Whether this host runs a verified jaxlib on CPU only (no TPU/GPU plugin installed)."""
    import jaxlib

    if not jaxlib.__version__.startswith(_VERIFIED_JAXLIB):
        return False
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] not in ("", "cpu"):
        return False
    return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)


def configure_cpu() -> bool:
    """Add :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` unless set already or too late.

    Call it before the first JAX computation (``train.pretrain.main`` and
    ``train.finetune.main`` do; a notebook calls it in its first cell).

    Returns:
      Whether the flags are in effect for this process's CPU backend.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if not flags_apply():
        return False
    missing = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if not missing:
        return all(f in flags for f in CPU_XLA_FLAGS)
    if _backends_started():
        return False
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
    return True
