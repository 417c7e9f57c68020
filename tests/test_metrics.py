"""GET /metrics against the running service: the exposition parses with prometheus_client's
parser, and the numbers move the way they should when events are posted, ignored, rejected,
when workers are recycled and when a shard dies."""

from __future__ import annotations

import os
import signal
import threading
import time

import requests
from prometheus_client.parser import text_string_to_metric_families
from service import SHARD_SERIES, TIMEOUT, uid

DEADLINE = 30.0  # seconds; only so that a hang fails


class Scrape:
    """One parsed scrape: samples by (name, labels), and which worker served it."""

    def __init__(self, resp: requests.Response) -> None:
        assert resp.status_code == 200, resp.text[:500]
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4"), resp.headers["Content-Type"]
        self.text = resp.text
        self.worker = resp.headers["X-Productd-Worker"]
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in self.families.values():
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in self.samples, f"duplicate series {key}"
                self.samples[key] = s.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of `name` whose labels include `labels` (e.g. over shards)."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and want <= lab)


def scrape(svc) -> Scrape:
    # requests.get opens a new connection each time, so successive scrapes may land on any worker.
    return Scrape(requests.get(svc.url + "/metrics", timeout=TIMEOUT))


def wait_scrape(svc, predicate, what: str) -> Scrape:
    end = time.monotonic() + DEADLINE
    while True:
        s = scrape(svc)
        if predicate(s):
            return s
        if time.monotonic() > end:
            raise AssertionError(f"metrics never showed {what}\n{s.text[-3000:]}")
        time.sleep(0.05)


def http_count(s: Scrape, route: str, method: str, status: str) -> float:
    return s.value("productd_http_requests_total", route=route, method=method, status=status)


def test_exposition_parses_and_has_every_shard_series(service):
    s = scrape(service)
    shards = {str(i) for i in range(service.shards)}
    for name in SHARD_SERIES:
        got = {dict(lab)["shard"] for (n, lab) in s.samples if n == name}
        assert got == shards, f"{name}: shard labels {got}, expected {shards}"
    assert s.families["productd_events_received"].type == "counter"
    assert s.families["productd_products"].type == "gauge"
    assert s.families["productd_apply_delay_seconds"].type == "histogram"
    assert s.families["productd_http_requests"].type == "counter"
    assert s.families["productd_http_request_duration_seconds"].type == "histogram"
    assert all(s.value("productd_shard_up", shard=i) == 1 for i in shards)
    # histogram buckets are cumulative and end in +Inf == count, per shard
    for shard in shards:
        buckets = sorted(
            ((float(dict(lab)["le"]), v) for (n, lab), v in s.samples.items()
             if n == "productd_apply_delay_seconds_bucket" and dict(lab)["shard"] == shard),
        )
        values = [v for _, v in buckets]
        assert values == sorted(values), buckets
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == s.value("productd_apply_delay_seconds_count", shard=shard)


def grew(before: Scrape, by: dict[str, int]):
    """A predicate: every named total (summed over shards) has grown by at least its amount.

    Counters only grow, so waiting for all of them and then asserting equality is exact even
    though a scrape is not an atomic snapshot of the shards' counters.
    """
    return lambda s: all(s.total(name) - before.total(name) >= n for name, n in by.items())


def test_posted_events_raise_received_applied_products_and_apply_histogram(service):
    n = 40
    prefix = uid("m")
    before = scrape(service)
    events = [{"product_id": f"{prefix}-{i}", "price": i, "stock": i} for i in range(n)]
    r = service.post(events)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": n}
    moved = {name: n for name in ("productd_events_received_total", "productd_events_applied_total",
                                  "productd_products", "productd_apply_delay_seconds_count")}
    after = wait_scrape(service, grew(before, moved), f"{n} more events applied")
    for name in moved:
        assert after.total(name) - before.total(name) == n, name
    assert after.total("productd_events_stale_total") == before.total("productd_events_stale_total")
    assert after.total("productd_apply_delay_seconds_bucket", le="+Inf") - before.total(
        "productd_apply_delay_seconds_bucket", le="+Inf") == n
    assert http_count(after, "events", "POST", "202") - http_count(before, "events", "POST", "202") == 1


def test_stale_event_counts_stale_not_applied(service):
    pid = uid("stale")
    before = scrape(service)
    assert service.post({"product_id": pid, "price": 1, "version": 5}).status_code == 202
    first = wait_scrape(service, grew(before, {"productd_events_received_total": 1,
                                               "productd_events_applied_total": 1}), "the versioned event applied")
    assert first.total("productd_events_stale_total") == before.total("productd_events_stale_total")
    assert service.post({"product_id": pid, "price": 2, "version": 5}).status_code == 202
    after = wait_scrape(service, grew(first, {"productd_events_received_total": 1,
                                              "productd_events_stale_total": 1}), "the stale event counted")
    assert after.total("productd_events_stale_total") - first.total("productd_events_stale_total") == 1
    assert after.total("productd_events_received_total") - first.total("productd_events_received_total") == 1
    assert after.total("productd_events_applied_total") == first.total("productd_events_applied_total")
    assert service.product(pid)["price"] == 1


def test_422_is_counted_by_route_method_status(service):
    before = scrape(service)
    r = service.post({"product_id": uid(), "price": -1})
    assert r.status_code == 422, r.text
    after = scrape(service)
    assert http_count(after, "events", "POST", "422") - http_count(before, "events", "POST", "422") == 1
    assert after.total("productd_events_received_total") == before.total("productd_events_received_total")


def test_every_worker_counted_whichever_worker_scrapes(service):
    base = scrape(service)
    seen: set[str] = set()
    made = 0
    for _ in range(200):  # bounded: new connections until both workers have served some
        r = requests.get(service.url + "/healthz", timeout=TIMEOUT)
        assert r.status_code == 200
        made += 1
        seen.add(r.headers["X-Productd-Worker"])
        if len(seen) == service.workers and made >= 10:
            break
    assert len(seen) == service.workers, f"only workers {seen} served 200 new connections"
    expected = http_count(base, "healthz", "GET", "200") + made
    scrapers: set[str] = set()
    for _ in range(200):
        s = scrape(service)
        scrapers.add(s.worker)
        assert http_count(s, "healthz", "GET", "200") == expected, f"scrape by worker {s.worker}"
        if len(scrapers) == service.workers:
            break
    assert len(scrapers) == service.workers, f"only workers {scrapers} served the scrapes"


def test_recycled_workers_keep_http_counters_and_scrape_does_not_grow(start_service, tmp_path):
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("max_requests = 10\nmax_requests_jitter = 0\n")
    svc = start_service(shards=2, workers=2, extra_args=["--gunicorn-config", str(conf)])
    healthz = 0
    workers: set[str] = set()

    def hit(count: int) -> None:
        nonlocal healthz
        for _ in range(count):
            r = requests.get(svc.url + "/healthz", timeout=TIMEOUT)
            assert r.status_code == 200
            workers.add(r.headers["X-Productd-Worker"])
            healthz += 1

    hit(10)
    scrape(svc)
    first = scrape(svc)  # every route and status this test uses has appeared by now
    hit(110)
    last = scrape(svc)
    assert len(workers) > svc.workers + 4, f"workers were not recycled: {workers}"
    assert http_count(last, "healthz", "GET", "200") == healthz == 120
    assert last.value("productd_http_request_duration_seconds_count", route="healthz") == healthz
    # nothing per worker: recycling adds no series and the text only grows by digits
    assert set(last.samples) == set(first.samples)
    assert len(last.text) < len(first.text) + 300, (len(first.text), len(last.text))


def test_shard_restart_counted(start_service):
    svc = start_service(shards=2, workers=1)
    before = scrape(svc)
    victim = svc.shard_pids()[1]
    os.kill(victim, signal.SIGKILL)
    after = wait_scrape(
        svc,
        lambda s: s.value("productd_shard_restarts_total", shard="1") == 1 and s.value("productd_shard_up", shard="1"),
        "shard 1 restarted",
    )
    assert before.value("productd_shard_restarts_total", shard="1") == 0
    assert after.value("productd_shard_restarts_total", shard="0") == 0
    assert after.value("productd_shard_state_lost_total", shard="1") == 1
    assert svc.shard_pids()[1] != victim


def test_rejected_events_counted_when_flood_gets_503(start_service):
    svc = start_service(shards=1, workers=2, extra_args=["--inbox-bytes", "4096", "--enqueue-timeout", "0.01"])
    prefix = uid("flood")
    lock = threading.Lock()
    totals = {"sent": 0, "accepted": 0, "not_accepted": 0, "503": 0}
    errors: list[str] = []

    def flood(worker: int) -> None:
        for round_ in range(3):
            events = [{"product_id": f"{prefix}-{worker}-{i % 50}", "price": i, "stock": round_}
                      for i in range(3000)]
            r = svc.post(events)
            with lock:
                totals["sent"] += len(events)
                if r.status_code == 202:
                    totals["accepted"] += r.json()["accepted"]
                elif r.status_code == 503:
                    body = r.json()
                    if "Retry-After" not in r.headers:
                        errors.append("503 without Retry-After")
                    totals["503"] += 1
                    totals["accepted"] += body["accepted"]
                    totals["not_accepted"] += len(body["not_accepted"])
                else:
                    errors.append(f"{r.status_code} {r.text[:300]}")

    shard = svc.shard_pids()[0]
    # Pause the shard for the first part of the flood so its 4 KiB inbox surely fills up.
    os.kill(shard, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=flood, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
    finally:
        os.kill(shard, signal.SIGCONT)
    for t in threads:
        t.join(DEADLINE)
        assert not t.is_alive(), "a flood request hung"
    assert not errors, errors
    assert totals["503"] >= 1, totals
    assert totals["accepted"] + totals["not_accepted"] == totals["sent"], totals
    s = wait_scrape(svc, lambda s: s.total("productd_events_received_total") >= totals["accepted"],
                    "every accepted event received")
    assert s.total("productd_events_rejected_total") == totals["not_accepted"], totals
    assert s.value("productd_events_rejected_total", shard="0") == totals["not_accepted"]
    assert s.total("productd_events_received_total") == totals["accepted"], totals
    assert http_count(s, "events", "POST", "503") == totals["503"]

