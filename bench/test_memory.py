"""Shard memory per product with 1 million products, restart time of a killed shard, start-up time.

Runs bench/memory.py against its own fresh productd (BENCH_MEMORY_PRODUCTS to change the count).
Reported in the session table (target: <= 300 bytes/product), not asserted.
"""

from __future__ import annotations

import pytest

from bench import live, memory, report


def test_memory_and_restart(benchmark):
    why = live.productd_available()
    if why:
        pytest.skip(why)
    benchmark.group = "memory"
    out = benchmark.pedantic(memory.run, kwargs={"log": lambda *_: None}, rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    report.record("memory", **out)
    # batch durability may lose the killed shard's last commit interval; a graceful stop loses nothing
    assert out["products_after_startup"] == out["products_after_restart"]
