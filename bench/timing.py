"""The one timing rule of the benchmarks: the median wall time of `repeats` calls after `warmup` calls
(which compile and fill caches). `fn` must block until its work is done (`jax.block_until_ready`, or
`torch.cuda.synchronize`)."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
