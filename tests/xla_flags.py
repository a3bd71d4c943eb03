"""XLA flags of the test processes: the pytest workers (tests/conftest.py) and the training
subprocesses they start (tests/train/train_testlib.cli_env).

Not set here: ``--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true``
for the whole suite. It cut ~25% of the wall time of compile-bound files, but in two full runs
one pytest worker then sat in one test until the 900 s timeout killed it (the unoptimised code
of an execution-heavy test), and xdist stalled after replacing the worker. Tests that are
compile-bound opt in per program (``tests/jaxattn/ops/visit_case.fast_jit``).
"""

from __future__ import annotations


def xla_flags_for(num_devices: int) -> list[str]:
    """The XLA flags for a test process with ``num_devices`` fake CPU devices."""
    return [f"--xla_force_host_platform_device_count={num_devices}"]
