"""Test setup: fake 8 CPU devices (before jax is imported) so sharding tests have a mesh."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Persistent XLA compilation cache for the test run: many tests compile the same programs
# (the same tiny model, step or kernel shape) in different test files and processes; with
# the cache a repeated compile is a disk read. Programs are keyed by their HLO, options and
# jax/jaxlib version, so a stale entry cannot be used. JAXATTN_TEST_JIT_CACHE=off disables
# it; any other value is the cache directory.
_cache = os.environ.get("JAXATTN_TEST_JIT_CACHE", "")
if _cache.lower() != "off":
    import tempfile

    _cache = _cache or os.path.join(tempfile.gettempdir(), f"jaxattn-test-jit-cache-{os.getuid()}")
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
