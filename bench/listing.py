"""Listing cost against catalogue size (issue 12): pages/s of a user_id-filtered page of 100 at
10,000 and at 1,000,000 products, while events are ingested.

    /tmp/venv/bin/python -m bench.listing            # BENCH_SECONDS (default 5) per measurement

For each size: a real `productd serve` (durability batch, 4 shards, 2 workers) makes its data
dir and stops; the bench then writes the catalogue straight into the shard files (through
productd.store.sqlite.ShardFile, each product in the file of the shard that owns it), so a
million products take seconds rather than a million POSTs; the service starts again and loads
them (which builds each shard's owner index). Every product is catalogued: the owner measured,
`bench-owner`, has 1,000 products at both sizes, the rest belong to owners of 100 products each.

First the solo ingest rate: two threads post NDJSON bulks of 500 events (random products) as fast
as they go for BENCH_SECONDS, counted as applied by /metrics. Then, while one thread posts events
at half that rate (or BENCH_LISTING_EVENTS per second), CLIENTS threads read pages for BENCH_SECONDS:
`GET /products?user_id=bench-owner&limit=100`, following next_cursor to the end of the owner's
products and starting again. Also timed, one request at a time: an unfiltered page of 100 and a
page filtered by name only (both scan every product of every shard).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from service import free_port, parse_metrics, service_env, wait_ready  # noqa: E402

from productd.actors.routing import shard_for  # noqa: E402
from productd.store.record import pack_fields  # noqa: E402
from productd.store.sqlite import ShardFile  # noqa: E402

SHARDS = 4
WORKERS = 2
OWNER = "bench-owner"
OWNER_PRODUCTS = 1000
OWNER_SIZE = 100  # products of every other owner
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
CLIENTS = int(os.environ.get("BENCH_LISTING_CLIENTS", "4"))
EVENTS_PER_SECOND = int(os.environ.get("BENCH_LISTING_EVENTS", "0"))  # 0: half the solo rate measured
EVENT_BULK = 500
# batch (productd's default): the catalogue is written into the shard files and loaded; none: no
# commits at all, the catalogue comes through HTTP (bare products by bulk events, the owner's
# products by POST /products), which leaves the listing's own cost alone in the measurement.
DURABILITY = os.environ.get("BENCH_LISTING_DURABILITY", "batch")


def fill(data_dir: Path, products: int) -> list[str]:
    layout = json.loads((data_dir / "productd.json").read_text())["layout"]
    files = [ShardFile(str(data_dir / layout / f"shard-{i:03d}.sqlite3"), sync=False) for i in range(SHARDS)]
    rng = random.Random(12)
    now = time.time_ns()
    batches: list[list] = [[] for _ in range(SHARDS)]
    ids = []
    owner_every = products // OWNER_PRODUCTS
    for i in range(products):
        product_id = f"p{i:07d}"
        ids.append(product_id)
        owner = OWNER if i % owner_every == 0 else f"owner-{i // OWNER_SIZE}"
        details = (owner, f"Product {i} {rng.choice(['red', 'blue', 'green'])} widget", None, ())
        packed = pack_fields(round(rng.uniform(0, 500), 2), rng.randint(0, 50), None, now, now, 1, details)
        shard = shard_for(product_id, SHARDS)
        batches[shard].append((product_id, packed))
        if len(batches[shard]) >= 50_000:
            files[shard].save(batches[shard])
            batches[shard] = []
    for shard, batch in enumerate(batches):
        if batch:
            files[shard].save(batch)
        files[shard].close()
    return ids


class Service:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.proc = None

    def start(self, deadline: float = 300.0) -> None:
        argv = [sys.executable, "-m", "productd", "serve", "--bind", f"127.0.0.1:{self.port}",
                "--shards", str(SHARDS), "--workers", str(WORKERS), "--durability", DURABILITY,
                "--data-dir", str(self.data_dir)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir.parent / f"productd-{self.port}.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=service_env(DURABILITY), cwd=self.data_dir.parent)
        log.close()
        wait_ready(self.port, self.proc, deadline)
        time.sleep(1.0)  # the second worker

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def _get(conn: http.client.HTTPConnection, path: str) -> dict:
    conn.request("GET", path)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: {resp.status} {data[:300]!r}")
    return json.loads(data)


def metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(v for (n, _), v in parse_metrics(text).items() if n == name)


def solo_rate(port: int, ids: list[str]) -> float:
    """Events applied per second with nothing else running: two posters as fast as they go."""
    stop = threading.Event()
    counters = [[0], [0]]
    posters = [threading.Thread(target=ingest, args=(port, ids, stop, c, 0.0), daemon=True) for c in counters]
    for t in posters:
        t.start()
    time.sleep(1.0)
    before, started = metric(port, "productd_events_applied_total"), time.monotonic()
    time.sleep(SECONDS)
    applied = metric(port, "productd_events_applied_total") - before
    elapsed = time.monotonic() - started
    stop.set()
    for t in posters:
        t.join()
    while metric(port, "productd_inbox_bytes") > 0:  # let the shards catch up before the next phase
        time.sleep(0.2)
    return applied / elapsed


def ingest(port: int, ids: list[str], stop: threading.Event, counter: list[int], rate: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    rng = random.Random(7)
    interval = EVENT_BULK / rate if rate else 0.0
    next_at = time.monotonic()
    while not stop.is_set():
        body = "\n".join(json.dumps({"product_id": rng.choice(ids), "stock": rng.randint(0, 50)})
                         for _ in range(EVENT_BULK)).encode()
        conn.request("POST", "/events", body, {"Content-Type": "application/x-ndjson"})
        resp = conn.getresponse()
        resp.read()
        if resp.status == 202:
            counter[0] += EVENT_BULK
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def lister(port: int, stop: threading.Event, pages: list[int], products: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    query = {"user_id": OWNER, "limit": 100}
    cursor = None
    while not stop.is_set():
        body = _get(conn, "/products?" + urlencode({**query, **({"cursor": cursor} if cursor else {})}))
        pages[0] += 1
        products[0] += len(body["products"])
        cursor = body["next_cursor"]


def latency(port: int, path: str, times: int = 5) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    took = []
    for _ in range(times):
        started = time.perf_counter()
        _get(conn, path)
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def fill_http(port: int, products: int) -> list[str]:
    """Bare products by bulk events, then the owner's OWNER_PRODUCTS by POST /products."""
    owned = set(range(0, products, products // OWNER_PRODUCTS))
    ids = [f"p{i:07d}" for i in range(products)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    rng = random.Random(12)
    bare = [i for i in range(products) if i not in owned]
    for start in range(0, len(bare), 10_000):
        body = "\n".join(json.dumps({"product_id": ids[i], "price": round(rng.uniform(0, 500), 2),
                                     "stock": rng.randint(0, 50)}) for i in bare[start:start + 10_000]).encode()
        conn.request("POST", "/events", body, {"Content-Type": "application/x-ndjson"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 202:
            raise RuntimeError(f"POST /events: {resp.status} {data[:300]!r}")
    for i in sorted(owned):
        doc = {"product_id": ids[i], "user_id": OWNER, "name": f"Product {i} red widget",
               "price": round(rng.uniform(0, 500), 2), "stock": rng.randint(0, 50)}
        conn.request("POST", "/products", json.dumps(doc).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 201:
            raise RuntimeError(f"POST /products: {resp.status} {data[:300]!r}")
    while metric(port, "productd_inbox_bytes") > 0:
        time.sleep(0.2)
    return ids


def prepare(products: int, tmp: str) -> tuple[Service, list[str], dict]:
    """A started service holding `products` products."""
    data_dir = Path(tmp) / f"data-{products}"
    if DURABILITY == "none":
        service = Service(data_dir)
        service.start()
        started = time.monotonic()
        ids = fill_http(service.port, products)
        return service, ids, {"products": products, "durability": DURABILITY,
                              "fill_s": round(time.monotonic() - started, 1)}
    service = Service(data_dir)
    service.start()
    service.stop()
    started = time.monotonic()
    ids = fill(data_dir, products)
    filled = time.monotonic() - started
    service = Service(data_dir)
    started = time.monotonic()
    service.start()
    return service, ids, {"products": products, "durability": DURABILITY, "fill_s": round(filled, 1),
                          "load_s": round(time.monotonic() - started, 1)}


def window(service: Service, ids: list[str], rate: float) -> tuple[float, float, int]:
    """(pages/s, events/s, inbox bytes left) of BENCH_SECONDS of listers while events come at `rate`."""
    stop = threading.Event()
    events = [0]
    feeder = threading.Thread(target=ingest, args=(service.port, ids, stop, events, rate), daemon=True)
    feeder.start()
    time.sleep(1.0)
    pages, listed = [0], [0]
    threads = [threading.Thread(target=lister, args=(service.port, stop, pages, listed), daemon=True)
               for _ in range(CLIENTS)]
    events[0] = 0
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    backlog = metric(service.port, "productd_inbox_bytes")
    feeder.join()
    while metric(service.port, "productd_inbox_bytes") > 0:
        time.sleep(0.2)
    assert listed[0] == 100 * pages[0] or pages[0] == 0, (listed, pages)
    return pages[0] / elapsed, events[0] / elapsed, int(backlog)


def main() -> None:
    """Both services run at once and are measured in turns (ROUNDS), so that what else runs on
    the machine weighs on both sizes alike; the ratio is of the medians."""
    sizes = [int(n) for n in os.environ.get("BENCH_LISTING_SIZES", "10000,1000000").split(",")]
    rounds = int(os.environ.get("BENCH_LISTING_ROUNDS", "3"))
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        prepared = [prepare(n, tmp) for n in sizes]
        try:
            for service, ids, result in prepared:
                result["solo_events_per_s"] = round(solo_rate(service.port, ids))
            for _ in range(rounds):
                for service, ids, result in prepared:
                    rate = EVENTS_PER_SECOND or result["solo_events_per_s"] / 2
                    pages, events, backlog = window(service, ids, rate)
                    result.setdefault("pages_per_s", []).append(round(pages, 1))
                    result.setdefault("events_per_s", []).append(round(events))
                    result.setdefault("inbox_backlog_bytes", []).append(backlog)
            for service, _, result in prepared:
                port = service.port
                result["idle_owner_page_ms"] = round(latency(port, f"/products?limit=100&user_id={OWNER}") * 1000, 2)
                result["idle_unfiltered_page_ms"] = round(latency(port, "/products?limit=100") * 1000, 1)
                result["idle_name_page_ms"] = round(latency(port, "/products?limit=100&name=red%20widget") * 1000, 1)
                result["median_pages_per_s"] = statistics.median(result["pages_per_s"])
                print(json.dumps(result))  # noqa: T201
        finally:
            for service, _, _ in prepared:
                service.stop()
    small, big = prepared[0][2], prepared[-1][2]
    print(f"user_id page of 100, median pages/s: {small['median_pages_per_s']} at {small['products']:,}, "  # noqa: T201
          f"{big['median_pages_per_s']} at {big['products']:,}: ratio "
          f"{big['median_pages_per_s'] / small['median_pages_per_s']:.2f} (target >= 0.5); {CLIENTS} clients, "
          f"events at half the solo rate ({small['solo_events_per_s']}/s and {big['solo_events_per_s']}/s solo)")


if __name__ == "__main__":
    main()
