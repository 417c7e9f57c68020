"""Run a function under pytest-benchmark's `pedantic` and also time each round ourselves.

Our own timings survive `--benchmark-disable` (where the fixture keeps no stats), so the
throughput figures we report do not depend on how pytest-benchmark was invoked.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def pedantic_median(
    benchmark, fn: Callable, *, args: tuple = (), setup: Callable | None = None, rounds: int = 5, warmup_rounds: int = 1
) -> float:
    """Median seconds of one measured round of fn."""
    durations: list[float] = []

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        durations.append(time.perf_counter() - t0)
        return out

    if setup is None:
        benchmark.pedantic(timed, args=args, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    else:
        benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    return statistics.median(durations[-rounds:])
