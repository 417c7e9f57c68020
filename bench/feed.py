"""The change feed under bulk ingestion (issue 12), briefly.

    python -m bench.feed        # BENCH_SECONDS (default 5) per phase

One `productd serve` (the bench's settings). Three phases of bulk ingestion (POST /events of
1,000-event NDJSON bodies from two threads): with no subscriber, with 10 idle subscribers
(`ids=` a product nobody writes: parked at every shard), and with one subscriber reading every
change. Prints JSON: events/s ingested per phase, changes/s delivered to the one subscriber, the
idle subscribers' cost. Targets: 50,000 changes/s delivered; idle subscribers cost < 5%.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

from bench import live

BODY = 1000
THREADS = 2


def ingest(port: int, seconds: float) -> float:
    """Events/s accepted by POST /events from THREADS threads for `seconds`."""
    counts = [0] * THREADS
    end = time.monotonic() + seconds

    def run(t: int) -> None:
        n = 0
        while time.monotonic() < end:
            ids = [f"feed-{t}-{(n + i) % 50_000}" for i in range(BODY)]
            counts[t] += live.post_ndjson(port, ids, chunk=BODY, seed=n)
            n += BODY

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def subscribe(port: int, query: str = "") -> socket.socket:
    sock = socket.create_connection((live.HOST, port))
    sock.sendall(f"GET /changes{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


class Counter(threading.Thread):
    """Reads one stream and counts its events (blank-line-terminated blocks with data)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock, self.events, self.cut_off, self.done = sock, 0, False, False
        self.last = time.monotonic()  # when the last event came (a cut-off ends the stream early)

    def run(self) -> None:
        tail = b""
        while not self.done:
            data = self.sock.recv(1 << 20)
            if not data:
                return
            data = tail + data
            self.events += data.count(b"\ndata: ")
            self.last = time.monotonic()
            self.cut_off = self.cut_off or b"event: cut-off" in data
            tail = data[-16:]


def main() -> int:
    seconds = live.bench_seconds()
    server = live.productd_server().start()
    try:
        ingest(server.port, 1.0)  # warm up: products exist, pages touched
        alone = ingest(server.port, seconds)
        idle = [subscribe(server.port, "?ids=nobody-writes-this") for _ in range(10)]
        time.sleep(0.5)
        with_idle = ingest(server.port, seconds)
        for sock in idle:
            sock.close()
        counter = Counter(subscribe(server.port))
        counter.start()
        time.sleep(0.5)
        started = time.monotonic()
        with_one = ingest(server.port, seconds)
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        counter.done = True
        delivered = counter.events / max(1e-3, min(counter.last - started, elapsed + 1.0))
    finally:
        server.stop()
    result = {
        "seconds": seconds,
        "events_per_s_no_subscriber": round(alone),
        "events_per_s_10_idle_subscribers": round(with_idle),
        "idle_cost_percent": round(100 * (1 - with_idle / alone), 1),
        "events_per_s_one_subscriber": round(with_one),
        "changes_per_s_delivered": round(delivered),  # while the stream lasted
        "changes_delivered": counter.events,
        "subscriber_cut_off": counter.cut_off,
        "targets": {"delivered": 50_000, "idle_cost_percent": 5},
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
