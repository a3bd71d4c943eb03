"""Test setup: fake 8 CPU devices (before jax is imported) so sharding tests have a mesh."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Opt-in persistent XLA compilation cache for the pytest processes
# (JAXATTN_TEST_JIT_CACHE=DIR): many tests compile the same programs in different files, and
# with the cache a repeated compile is a disk read. It is off by default: jax writes an entry
# non-atomically, so one xdist worker can read another's half-written executable, and an
# earlier run of this suite hung with interpret-mode kernels reloaded from a shared cache.
# The training subprocesses of tests/train keep their own per-worker cache (train_testlib).
_cache = os.environ.get("JAXATTN_TEST_JIT_CACHE", "off")
if _cache.lower() != "off":
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
