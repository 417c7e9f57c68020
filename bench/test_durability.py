"""Issue 3's measurements: what each durability mode costs, on the wire and on disk.

- events/s, p50 and p99 for `productd serve --durability none|batch|sync` (each its own server with a
  fresh temporary --data-dir, preloaded with 10,000 products) under the same concurrent load: one
  event per POST over 32 keep-alive connections (`post_single`) and 1,000 NDJSON events per POST over
  8 connections (`post_bulk_ndjson`). Per load the three modes run back to back, so sync/batch and
  none/batch compare runs seconds apart;
- bytes per product on disk (shard files after a graceful stop), bytes per product in memory and the
  time to start with 1 million products, all from bench/memory.py's 1M-product run (shared with
  test_memory.py when both run in one session).

Numbers go to pytest-benchmark's `extra_info` and to the "durability" section of
bench/results/latest.md via bench/report.py. Nothing here asserts a speed.
"""

from __future__ import annotations

import pytest

from bench import live, memory, report


class ModeFleet:
    """One productd per durability mode, started and preloaded on first use, kept for the module."""

    def __init__(self) -> None:
        self.servers: dict[str, live.Server] = {}
        self.failed: dict[str, str] = {}

    def get(self, mode: str) -> live.Server:
        if mode in self.failed:
            pytest.fail(self.failed[mode])
        if mode not in self.servers:
            server = live.productd_server(extra=["--durability", mode])
            try:
                server.start()
                live.preload(server)
            except Exception as exc:
                server.stop()
                # a mode that does not start is a defect of that mode: fail, do not skip
                self.failed[mode] = f"productd --durability {mode} did not start or preload: {exc}"
                pytest.fail(self.failed[mode])
            self.servers[mode] = server
        return self.servers[mode]

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="module")
def fleet():
    why = live.productd_available()
    if why:
        pytest.fail(why)
    f = ModeFleet()
    yield f
    f.stop()


@pytest.mark.parametrize("mode", report.DURABILITY_MODES)
@pytest.mark.parametrize("load_name", report.DURABILITY_LOADS)
def test_durability_events(benchmark, fleet, load_name, mode):
    server = fleet.get(mode)
    warmup = live.env_float("BENCH_WARMUP", 1.0)
    if warmup > 0:
        live.run_load(server, load_name, seconds=warmup, warmup=0)
    load_1min = live.loadavg()[0]
    benchmark.group = f"durability {load_name}"
    result = benchmark.pedantic(
        live.run_load,
        args=(server, load_name),
        kwargs={"warmup": 0, "server_name": f"productd --durability {mode}"},
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(result.as_dict(), durability=mode, loadavg_1min=load_1min)
    report.record_durability(mode, result, load_1min)
    print(
        f"\n{mode:5} {load_name:17} [{result.tool}] {result.rps:10,.0f} req/s {result.events_per_s:10,.0f} ev/s "
        f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms non-2xx {result.non_2xx} (load {load_1min:.2f})"
    )
    assert result.requests > 0, f"no request completed against productd --durability {mode}"


def test_durability_disk_and_startup(benchmark):
    why = live.productd_available()
    if why:
        pytest.fail(why)
    benchmark.group = "durability storage"
    reused = memory.has_run()
    load_1min = live.loadavg()[0]
    out = benchmark.pedantic(memory.run_once, kwargs={"log": lambda *_: None}, rounds=1, iterations=1)
    facts = {
        key: out.get(key)
        for key in (
            "products",
            "durability",
            "disk_bytes_per_product",
            "disk_shard_bytes",
            "disk_shard_files",
            "disk_wal_shm_bytes",
            "disk_products",
            "bytes_per_product",
            "startup_seconds",
            "products_after_startup",
            "final_stop_exit_code",
        )
    }
    facts["loadavg_1min"] = load_1min
    benchmark.extra_info.update(facts, reused_earlier_run=reused)
    report.record_durability_storage(**facts)
    print(f"\n{facts}")
    # the files hold what the last start loaded: a graceful stop loses nothing
    assert out["disk_products"] == out["products_after_startup"]
