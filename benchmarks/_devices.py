"""Nominal ceilings of the accelerators the benchmarks report against (vendor datasheets).

``chip(kind)`` gives the HBM bandwidth (GB/s) and the dense bf16 matrix peak (TFLOP/s, no
sparsity) of a ``jax.Device.device_kind``, matched by prefix; the first match wins, so a
specific name ("NVIDIA H100 PCIe") sits before the general one ("NVIDIA H100", which the
SXM part reports as "NVIDIA H100 80GB HBM3"). Measured ceilings are lower (an H200 ran an
8192³ bf16 matmul at about 790 TFLOP/s); the benchmarks print both where they can.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet ceilings of one chip: HBM GB/s and dense bf16 TFLOP/s."""

    hbm_gbps: float
    bf16_tflops: float


CHIPS = {
    "NVIDIA H100 PCIe": Chip(hbm_gbps=2000, bf16_tflops=756),
    "NVIDIA H100 NVL": Chip(hbm_gbps=3900, bf16_tflops=835),
    "NVIDIA H100": Chip(hbm_gbps=3350, bf16_tflops=989),  # SXM
    "NVIDIA H200": Chip(hbm_gbps=4800, bf16_tflops=989),
    "TPU v4": Chip(hbm_gbps=1200, bf16_tflops=275),
    "TPU v5 lite": Chip(hbm_gbps=819, bf16_tflops=197),
    "TPU v5e": Chip(hbm_gbps=819, bf16_tflops=197),
    "TPU v5p": Chip(hbm_gbps=2765, bf16_tflops=459),
    "TPU v5": Chip(hbm_gbps=2765, bf16_tflops=459),
    "TPU v6": Chip(hbm_gbps=1640, bf16_tflops=918),
    "TPU7x": Chip(hbm_gbps=7370, bf16_tflops=2307),
}


def chip(device_kind: str | None = None) -> Chip | None:
    """The datasheet ceilings of ``device_kind`` (default: the first device), or None."""
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    return next((c for prefix, c in CHIPS.items() if kind.startswith(prefix)), None)


def hbm_gbps(device_kind: str | None = None) -> float | None:
    """Nominal HBM bandwidth in GB/s, or None for an unknown device (a CPU)."""
    c = chip(device_kind)
    return None if c is None else c.hbm_gbps


def bf16_tflops(device_kind: str | None = None) -> float | None:
    """Dense bf16 matrix peak in TFLOP/s, or None for an unknown device."""
    c = chip(device_kind)
    return None if c is None else c.bf16_tflops
