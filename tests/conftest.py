"""Test setup: fake 8 CPU devices (before jax is imported) so sharding tests have a mesh."""

import os

from xla_flags import xla_flags_for

# fake devices (before jax is imported) and faster compiles, unless the caller set them
for _flag in xla_flags_for(8):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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


# Memory bound of a pytest worker: jax keeps every compiled program (and the arrays of module
# globals) for the process's lifetime, and a worker runs ~750 tests; two workers plus the
# training subprocesses outgrew this 24 GiB machine once (a worker died, "node down"). After a
# test module whose worker's resident size is above the bound, the compiled programs are
# dropped (later modules recompile what they use again).
_RSS_BOUND = int(float(os.environ.get("JAXATTN_TEST_RSS_GIB", "4")) * 2**30)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True, scope="module")
def _bounded_worker_memory():
    yield
    if os.path.exists("/proc/self/statm") and _rss_bytes() > _RSS_BOUND:
        import gc

        jax.clear_caches()
        gc.collect()
