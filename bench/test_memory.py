"""Shard memory per product with 1 million products, restart time of a killed shard, start-up time.

Runs bench/memory.py against its own fresh productd (BENCH_MEMORY_PRODUCTS to change the count), or
reuses the run test_durability.py made earlier in the session (one 1M-product run serves both).
Reported in the session table (target: <= 300 bytes/product), not asserted.
"""

from __future__ import annotations

import pytest

from bench import live, memory, report


def test_memory_and_restart(benchmark):
    why = live.productd_available()
    if why:
        pytest.fail(why)
    benchmark.group = "memory"
    reused = memory.has_run()
    out = benchmark.pedantic(memory.run_once, kwargs={"log": lambda *_: None}, rounds=1, iterations=1)
    benchmark.extra_info.update(out, reused_earlier_run=reused)
    report.record("memory", **out)
    # batch durability may lose the killed shard's last commit interval; a graceful stop loses nothing
    assert out["products_after_startup"] == out["products_after_restart"]
