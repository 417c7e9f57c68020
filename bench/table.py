"""The HTTP table of test_http.py without pytest-benchmark: every load against every server, back to back.

    python -m bench.table [LOAD,LOAD...]

Same servers, loads, settings and report (bench/report.py) as `pytest bench/test_http.py`; prints
the markdown table with the targets.
"""

from __future__ import annotations

import os
import sys
import time

from bench import live, report


def main(argv: list[str]) -> int:
    loads = argv[0].split(",") if argv else list(live.LOADS)
    report.meta.update(
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command="python -m bench.table " + " ".join(argv),
        seconds=live.bench_seconds(), warmup=live.env_float("BENCH_WARMUP", 1.0),
        connections=live.env_int("BENCH_CONNECTIONS", 32), bulk_connections=live.env_int("BENCH_BULK_CONNECTIONS", 8),
        gunicorn=live.gunicorn_settings(), host=os.uname().nodename,
    )
    servers = {}
    try:
        for name in report.SERVERS:
            server = live.productd_server() if name == "productd" else live.baseline_server(name)
            servers[name] = server.start()
            live.preload(server)
        for load in loads:
            for name, server in servers.items():
                result = live.run_load(server, load)
                report.record_http(result)
                print(f"{name:13} {load:17} [{result.tool}] {result.rps:10,.0f} req/s "
                      f"{result.events_per_s:10,.0f} ev/s p99 {result.p99_ms:.2f} ms non-2xx {result.non_2xx} "
                      f"load {live.loadavg()[0]:.2f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
