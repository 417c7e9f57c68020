"""Actors level: from a front-end handle (ShardClient) through a real inbox pipe to a real shard process.

- one-way events/s: `ShardClient.submit` of single events and of 1,000-event batches; each round
  ends with one read, which travels behind the events in the FIFO inbox, so the time covers the
  shard applying them, not only the writes. Run with durability "none" and "batch" (SQLite file
  in a temporary directory);
- read round trips/s and their latency: `ShardClient.read` (GET frame in the inbox, reply datagram);
- the shard's own decode + apply loop (`Shard.handle`) in process, without the pipe.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import statistics
import time

import pytest

from bench import report
from bench.live import load_test_module
from bench.timing import pedantic_median
from productd.actors import protocol, status
from productd.actors.client import ShardClient
from productd.actors.inbox import Inbox
from productd.actors.shard import Shard
from productd.actors.status import StatusBoard

frames = load_test_module("frames")

SECTION = "actors (ShardClient -> inbox pipe -> 1 shard process)"
N_PRODUCTS = 10_000


def _event(i: int) -> tuple[str, float, int, None]:
    return (f"p{i % N_PRODUCTS:05d}", 1.0 + i % 100, i % 1000, None)


def _shard_main(inbox: Inbox, board: StatusBoard, kwargs: dict) -> None:
    os.close(inbox.write_fd)
    try:  # as the supervisor runs them
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    os._exit(Shard(0, inbox.read_fd, board, **kwargs).run())


@pytest.fixture(scope="module", params=["none", "batch"])
def client(request, tmp_path_factory):
    kwargs = {}
    if request.param != "none":
        kwargs = {"durability": request.param, "path": str(tmp_path_factory.mktemp("shard") / "shard-0.sqlite")}
    inbox = Inbox(1 << 20)
    board = StatusBoard(1)
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_shard_main, args=(inbox, board, kwargs), daemon=True)
    proc.start()
    os.close(inbox.read_fd)
    deadline = time.monotonic() + 30
    while board.state(0) != status.READY:
        assert proc.is_alive() and time.monotonic() < deadline, "bench shard did not become ready"
        time.sleep(0.01)
    c = ShardClient([inbox.write_fd], board, enqueue_timeout=10.0, read_timeout=10.0)
    c.durability = request.param
    c.submit([_event(i) for i in range(N_PRODUCTS)])  # every product exists
    c.read("p00000")
    yield c
    frames.write_frame(inbox.write_fd, protocol.stop_frame(), time.monotonic() + 30)
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    os.close(inbox.write_fd)


def _one_way(client: ShardClient, batches: list[list[tuple]]) -> None:
    for batch in batches:
        sub = client.submit(batch)
        assert not sub.not_accepted, sub
    client.read("p00000")  # behind every event: returns once the shard applied them


@pytest.mark.parametrize("batch", [1, 1000])
def test_actors_one_way(benchmark, client, batch):
    total = 20_000 if batch > 1 else 5_000
    batches = [[_event(b * batch + k) for k in range(batch)] for b in range(total // batch)]
    benchmark.group = "actors one-way"
    per_s = total / pedantic_median(benchmark, _one_way, args=(client, batches), rounds=5)
    benchmark.extra_info.update(events=total, batch=batch, durability=client.durability, events_per_s=round(per_s))
    report.record(SECTION, **{f"one-way events/s, batch {batch}, durability {client.durability}": round(per_s)})


def test_actors_read_round_trip(benchmark, client):
    n = 2_000
    ids = [f"p{(i * 7919) % N_PRODUCTS:05d}" for i in range(n)]
    latencies: list[float] = []

    def reads() -> None:
        read, clock = client.read, time.perf_counter
        for product_id in ids:
            t0 = clock()
            assert read(product_id) is not None
            latencies.append(clock() - t0)

    benchmark.group = "actors read"
    per_s = n / pedantic_median(benchmark, reads, rounds=3)
    q = statistics.quantiles(latencies[-3 * n :], n=100)
    d = client.durability
    benchmark.extra_info.update(reads=n, durability=d, reads_per_s=round(per_s), p50_us=q[49] * 1e6, p99_us=q[98] * 1e6)
    report.record(
        SECTION,
        **{
            f"read round trips/s, durability {d}": round(per_s),
            f"read p50 us, durability {d}": q[49] * 1e6,
            f"read p99 us, durability {d}": q[98] * 1e6,
        },
    )


def test_actors_shard_handle_in_process(benchmark):
    """Decode frames + apply, as the shard loop does for what one os.read() returns, without processes."""
    packed = [(i, protocol.pack_event(*_event(i))) for i in range(20_000)]
    frames = protocol.events_frames(packed, None, itertools.count(1), time.time_ns())
    bodies = [item[-1][protocol.HEADER_SIZE :] for item in frames]
    board = StatusBoard(1)

    benchmark.group = "actors shard loop"
    seconds = pedantic_median(
        benchmark, lambda shard: shard.handle(bodies), setup=lambda: ((Shard(0, -1, board),), {}), rounds=10
    )
    per_s = len(packed) / seconds
    benchmark.extra_info.update(events=len(packed), frames=len(bodies), events_per_s=round(per_s))
    report.record(SECTION, **{"shard decode+apply events/s (in process, durability none)": round(per_s)})
