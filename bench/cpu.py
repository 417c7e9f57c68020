"""Where the CPU goes: microseconds of CPU per request, by role, during a load run.

    python -m bench.cpu LOAD ROUNDS TARGET [TARGET...]
    python -m bench.cpu post_single 3 ceiling productd "productd:--apply-delay 0"

TARGET is `ceiling`, `naive`, or `productd` with optional `serve` arguments after a colon. Each
process's run time comes from /proc/PID/task/TID/schedstat (nanoseconds the scheduler gave it, not
sampled ticks); the load generator's from this process's children times. On a machine whose cores
are saturated, requests/s = cores / (total CPU per request), so this splits a throughput gap into
its parts: gunicorn workers, shard processes, and the load generator.
"""

from __future__ import annotations

import os
import shlex
import sys

from bench import live


def _run_ns(pid: int) -> int:
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _server(target: str) -> live.Server:
    name, _, args = target.partition(":")
    if name == "productd":
        return live.productd_server(extra=shlex.split(args))
    return live.baseline_server(name)


def measure(server: live.Server, load: str, seconds: float) -> str:
    live.run_load(server, load, seconds=1, warmup=0)
    pids = live.descendants(server.proc.pid)
    before = {pid: _run_ns(pid) for pid in pids}
    t0 = os.times()
    result = live.run_load(server, load, seconds=seconds, warmup=0)
    t1 = os.times()
    n = max(1, result.requests)
    roles: dict[str, float] = {}
    for pid in pids:
        us = (_run_ns(pid) - before[pid]) / 1e3 / n
        # productd: the supervisor's children are the shards and the gunicorn arbiter (which
        # idles); everything below the arbiter is a worker. Baselines: all workers.
        role = "shards" if server.name == "productd" and live.service.parent(pid) == server.proc.pid else "workers"
        roles[role] = roles.get(role, 0.0) + us
    generator = ((t1.children_user + t1.children_system) - (t0.children_user + t0.children_system)) * 1e6 / n
    total = sum(roles.values()) + generator
    parts = "  ".join(f"{role} {us:6.1f}" for role, us in sorted(roles.items()))
    return (f"{result.rps:8,.0f} req/s | CPU us/request: {parts}  {result.tool} {generator:5.1f}  "
            f"total {total:6.1f} | p99 {result.p99_ms:.2f} ms")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    load, rounds, targets = argv[0], int(argv[1]), argv[2:]
    seconds = live.env_float("BENCH_SECONDS", 4.0)
    servers: list[tuple[str, live.Server]] = []
    try:
        for target in targets:
            server = _server(target).start()
            servers.append((target, server))
            live.preload(server)
        for _ in range(rounds):
            for target, server in servers:
                print(f"{load:12} {target:36} {measure(server, load, seconds)}", flush=True)
    finally:
        for _, server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
