"""HTTP throughput and latency of productd, side by side with the ceiling and the naive peer.

One session starts all three servers (same gunicorn worker class, workers and threads; naive with
one worker), preloads 10,000 products into each, and runs every load against each server back to
back, so the ratios compare runs a few seconds apart. Numbers go to pytest-benchmark's
`extra_info` (see `--benchmark-json`) and to bench/results/latest.md via bench/report.py.
Nothing here asserts a speed: targets are reported as pass/miss in the table.
"""

from __future__ import annotations

import pytest

from bench import live, report


class Fleet:
    """Servers started on first use and kept for the session."""

    def __init__(self) -> None:
        self.servers: dict[str, live.Server] = {}
        self.failed: dict[str, str] = {}

    def get(self, name: str) -> live.Server:
        if name in self.failed:
            pytest.fail(self.failed[name])
        if name not in self.servers:
            try:
                if name == "productd":
                    why = live.productd_available()
                    if why:
                        raise RuntimeError(f"productd is not runnable: {why}")
                    server = live.productd_server()
                else:
                    server = live.baseline_server(name)
                server.start()
                try:
                    live.preload(server)
                except BaseException:
                    server.stop()
                    raise
            except Exception as exc:  # noqa: BLE001 - one missing server must not hide the others
                self.failed[name] = f"{name} did not start: {exc}"
                pytest.fail(self.failed[name])
            self.servers[name] = server
        return self.servers[name]

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def fleet():
    f = Fleet()
    yield f
    f.stop()


@pytest.mark.parametrize("server_name", report.SERVERS)
@pytest.mark.parametrize("load_name", list(live.LOADS))
def test_http(benchmark, fleet, load_name, server_name):
    server = fleet.get(server_name)
    warmup = live.env_float("BENCH_WARMUP", 1.0)
    if warmup > 0:
        live.run_load(server, load_name, seconds=warmup, warmup=0)
    benchmark.group = f"http {load_name}"
    result = benchmark.pedantic(live.run_load, args=(server, load_name), kwargs={"warmup": 0}, rounds=1, iterations=1)
    benchmark.extra_info.update(result.as_dict())
    report.record_http(result)
    print(
        f"\n{server_name:9} {load_name:17} [{result.tool}] {result.rps:10,.0f} req/s {result.events_per_s:10,.0f} ev/s "
        f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms non-2xx {result.non_2xx}"
    )
    assert result.requests > 0, f"no request completed against {server_name}"
