"""What the benchmark scripts share: the median-time loop and the tokamax import."""

from __future__ import annotations

import math
import statistics
import time

import jax

__all__ = ["import_tokamax", "median_seconds"]


def median_seconds(fn, args, repeats: int, min_run_s: float = 0.0, clock=time.perf_counter):
    """Median seconds per call of ``fn(*args)`` over ``repeats`` timed runs, after a warm-up.

    Args:
      fn, args: the (jitted) function and its arguments.
      repeats: timed runs; the median is returned.
      min_run_s: when positive, each run is a burst of back-to-back calls lasting about this
        long (sized from one timed call), so launch latency does not dominate short calls.
      clock: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time of all threads).
    """
    jax.block_until_ready(fn(*args))
    n = 1
    if min_run_s > 0:
        t0 = clock()
        jax.block_until_ready(fn(*args))
        n = min(1000, max(1, math.ceil(min_run_s / max(clock() - t0, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((clock() - t0) / n)
    return statistics.median(times)


def import_tokamax():
    """The tokamax module (with absl's flags marked parsed: tokamax reads absl flags, which
    would otherwise parse the calling script's argv). Raises what the import raises."""
    import tokamax
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    return tokamax
