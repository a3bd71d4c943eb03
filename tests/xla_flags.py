"""XLA flags of the test processes: the pytest workers (tests/conftest.py) and the training
subprocesses they start (tests/train/train_testlib.cli_env)."""

from __future__ import annotations

# The suite is bound by XLA's compile time (thousands of small programs, eager ops included),
# not by run time: on a CPU-only host the test processes compile without LLVM's optimisations.
# Measured on the 2-core VM (loaded, same files back to back, repeated): lowrank molora+hydra
# 64-68 s -> 49 s; the TPU flash kernel in the interpreter + the LoRA fine-tune CLI tests
# 433 s -> 322 s. Accelerator hosts and unverified jaxlibs keep XLA's defaults (XLA aborts on
# unknown flags; see train.platform.flags_apply).
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


def xla_flags_for(num_devices: int) -> list[str]:
    """The XLA flags for a test process with ``num_devices`` fake CPU devices."""
    from train.platform import flags_apply

    flags = [f"--xla_force_host_platform_device_count={num_devices}"]
    return flags + list(FAST_COMPILE_FLAGS) if flags_apply() else flags
