"""Store level: events applied per second by one shard's ShardStore, pure Python, no processes.

The loop is the one a shard runs for each event it reads: `store.apply(product_id, price, stock,
version, now_ns)`. Three cases: new products (insert), existing products (update), and versioned
events half of which are stale. Reads: `get_packed` (what a shard answers a GET with).
"""

from __future__ import annotations

import time

from bench import report
from bench.timing import pedantic_median
from productd.store import memory as store_memory

N_EVENTS = 20_000
N_PRODUCTS = 10_000


def _events(versioned: bool = False) -> list[tuple[str, float | None, int | None, int | None]]:
    out = []
    for i in range(N_EVENTS):
        version = (i // 2 if i % 2 == 0 else i // 2 - 1) if versioned else None  # every 2nd one is stale
        out.append((f"p{i % N_PRODUCTS:05d}", 1.0 + i % 100, i % 1000, version))
    return out


def _apply_all(store, events) -> int:
    now = time.time_ns()
    apply = store.apply
    applied = 0
    for product_id, price, stock, version in events:
        applied += apply(product_id, price, stock, version, now)
    return applied


def _record(benchmark, name: str, events: int, seconds: float) -> None:
    per_s = events / seconds
    benchmark.extra_info.update(events=events, events_per_s=round(per_s))
    report.record("store (one ShardStore, in process)", **{f"{name} events/s": round(per_s)})


def test_store_apply_insert(benchmark):
    """Every event creates a product (fresh store each round)."""
    events = [(f"q{i:011d}", 1.5, i, None) for i in range(N_EVENTS)]
    benchmark.group = "store"
    seconds = pedantic_median(benchmark, _apply_all, setup=lambda: ((store_memory.ShardStore(), events), {}), rounds=10)
    _record(benchmark, "insert", N_EVENTS, seconds)


def test_store_apply_update(benchmark):
    """Events for products that exist already (the steady state)."""
    store = store_memory.ShardStore()
    events = _events()
    _apply_all(store, events)
    benchmark.group = "store"
    seconds = pedantic_median(benchmark, _apply_all, args=(store, events), rounds=10)
    _record(benchmark, "update", N_EVENTS, seconds)


def test_store_apply_versioned(benchmark):
    """Versioned events, half of them stale (ignored whole)."""
    events = _events(versioned=True)
    benchmark.group = "store"
    seconds = pedantic_median(benchmark, _apply_all, setup=lambda: ((store_memory.ShardStore(), events), {}), rounds=10)
    _record(benchmark, "versioned, 50% stale", N_EVENTS, seconds)


def test_store_get_packed(benchmark):
    store = store_memory.ShardStore()
    _apply_all(store, _events())
    ids = [f"p{i:05d}" for i in range(N_PRODUCTS)]

    def read_all() -> None:
        get = store.get_packed
        for product_id in ids:
            get(product_id)

    benchmark.group = "store"
    per_s = N_PRODUCTS / pedantic_median(benchmark, read_all, rounds=10)
    benchmark.extra_info.update(reads=N_PRODUCTS, reads_per_s=round(per_s))
    report.record("store (one ShardStore, in process)", **{"get_packed reads/s": round(per_s)})
