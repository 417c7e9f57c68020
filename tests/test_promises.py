"""The six promises of docs/design.md ("Promises, and the tests that hold them"), each tested
through real HTTP against a running productd.

(5, nothing acknowledged is lost, is also exercised by test_stress.py: floods, killed shards, SIGTERM.)
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import requests
from service import TIMEOUT, assert_problem, pointers, uid


def post_ok(service, body, session=None) -> None:
    poster = session or requests
    r = poster.post(service.url + "/events", json=body, timeout=TIMEOUT, headers={"Connection": "close"})
    assert r.status_code == 202, f"{r.status_code} {r.text}"
    assert r.json()["accepted"] == (len(body) if isinstance(body, list) else 1)


def assert_stale_delta(service, before: float, expected: int) -> None:
    """The stale counter (summed over shards) moved by exactly `expected`.

    Counters are published per batch, a moment after the batch's reads are answered: wait for
    the expected value (bounded), then check it did not overshoot.
    """
    service.wait_for(lambda: service.metric_sum("productd_events_stale_total") - before >= expected,
                     f"{expected} stale events to be counted", 10)
    assert service.metric_sum("productd_events_stale_total") - before == expected


def run_threads(fn, args_list, workers=8) -> list:
    """Run fn(*args) for each args in parallel; re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *args) for args in args_list]
        return [f.result(timeout=300) for f in futures]


# ---------------------------------------------------------------- 1. per-product order


def test_order_one_client_one_product(service):
    product = uid("order")
    for i in range(200):
        event = {"product_id": product, "price": float(i)} if i % 2 else {"product_id": product, "price": float(i),
                                                                           "stock": i}
        post_ok(service, event)
    body = service.product(product)
    assert body["price"] == 199.0, body
    assert body["stock"] == 198, body


def test_order_threads_each_owning_products(service):
    base = uid("owner")
    n_threads, n_events = 8, 40

    def client(t: int) -> None:
        for i in range(n_events):
            post_ok(service, {"product_id": f"{base}-{t}", "stock": i, "price": t * 1000 + i})

    run_threads(client, [(t,) for t in range(n_threads)])
    for t in range(n_threads):
        body = service.product(f"{base}-{t}")
        assert (body["stock"], body["price"]) == (n_events - 1, t * 1000 + n_events - 1), body


def test_order_within_bulk_arrays_last_wins(service):
    base = uid("bulkorder")
    products = [f"{base}-{k}" for k in range(3)]
    # Interleaved, several frames' worth (far more than one PIPE_BUF), each product many times.
    events = [{"product_id": products[i % 3], "stock": i, "price": i / 4} for i in range(900)]
    post_ok(service, events)
    for k, product in enumerate(products):
        last = max(i for i in range(900) if i % 3 == k)
        body = service.product(product)
        assert (body["stock"], body["price"]) == (last, last / 4), (product, body)

    # The same through NDJSON, and a second bulk request after the first one's 202.
    lines = "\n".join(f'{{"product_id": "{products[0]}", "stock": {i}}}' for i in range(500)).encode()
    r = requests.post(service.url + "/events", data=lines, headers={"Content-Type": "application/x-ndjson"},
                      timeout=TIMEOUT)
    assert r.status_code == 202, r.text
    assert service.product(products[0])["stock"] == 499


# ---------------------------------------------------------------- 2. read your writes


def test_read_your_writes_across_connections_and_workers(service):
    product = uid("ryw")
    served: set[str] = set()
    crossed = 0  # reads served by a different worker than the write before them
    i = 0
    # New connection for every request (no Session, Connection: close) so that requests spread over
    # the gunicorn workers. Bounded: at least 100 rounds, more only until two workers have taken part.
    while i < 100 or (crossed < 5 and i < 1000):
        w = requests.post(service.url + "/events", json={"product_id": product, "stock": i},
                          headers={"Connection": "close"}, timeout=TIMEOUT)
        assert w.status_code == 202, w.text
        r = requests.get(f"{service.url}/products/{product}", headers={"Connection": "close"}, timeout=TIMEOUT)
        assert r.status_code == 200, f"round {i}: {r.status_code} {r.text}"
        assert r.json()["stock"] == i, f"round {i}: wrote stock={i}, read {r.json()}"
        ww, rw = w.headers["X-Productd-Worker"], r.headers["X-Productd-Worker"]
        served |= {ww, rw}
        crossed += ww != rw
        i += 1
    assert len(served) > 1, f"only worker(s) {served} served {2 * i} requests"
    assert crossed > 0, "no read was served by another worker than its write"


def test_read_your_writes_concurrent_clients(service):
    base = uid("ryw-many")

    def client(t: int) -> int:
        for i in range(25):
            product = f"{base}-{t}-{i % 5}"
            post_ok(service, {"product_id": product, "price": i, "version": i})
            body = service.product(product)
            assert body["version"] == i and body["price"] == i, (product, i, body)
        return t

    run_threads(client, [(t,) for t in range(6)])


# ---------------------------------------------------------------- 3. versions beat arrival


def test_versions_stale_and_duplicates_ignored_and_counted(service):
    product = uid("ver")
    stale_before = service.metric_sum("productd_events_stale_total")

    post_ok(service, {"product_id": product, "price": 5.0, "stock": 50, "version": 5})
    post_ok(service, {"product_id": product, "price": 3.0, "stock": 30, "version": 3})  # older: ignored whole
    post_ok(service, {"product_id": product, "price": 55.0, "version": 5})  # duplicate version: ignored whole
    body = service.product(product)
    assert (body["price"], body["stock"], body["version"]) == (5.0, 50, 5), body

    post_ok(service, {"product_id": product, "stock": 7, "version": 7})  # newer, partial: merges
    body = service.product(product)
    assert (body["price"], body["stock"], body["version"]) == (5.0, 7, 7), body

    post_ok(service, {"product_id": product, "price": 9.0})  # no version: applies, keeps version 7
    post_ok(service, {"product_id": product, "stock": 8, "version": None})  # null = absent
    body = service.product(product)
    assert (body["price"], body["stock"], body["version"]) == (9.0, 8, 7), body

    post_ok(service, {"product_id": product, "price": 1.0, "version": 6})  # still older than 7: ignored
    body = service.product(product)
    assert (body["price"], body["stock"], body["version"]) == (9.0, 8, 7), body

    assert_stale_delta(service, stale_before, 3)


def test_version_zero_and_first_version(service):
    product = uid("ver0")
    post_ok(service, {"product_id": product, "stock": 1})  # no version yet
    assert service.product(product)["version"] is None
    post_ok(service, {"product_id": product, "stock": 2, "version": 0})  # any version beats none
    body = service.product(product)
    assert (body["stock"], body["version"]) == (2, 0), body
    post_ok(service, {"product_id": product, "stock": 3, "version": 0})  # equal: stale
    assert service.product(product)["stock"] == 2


def test_higher_version_wins_regardless_of_arrival_in_bulk(service):
    product = uid("shuffle")
    versions = list(range(1, 301))
    random.Random(7).shuffle(versions)
    stale_before = service.metric_sum("productd_events_stale_total")
    post_ok(service, [{"product_id": product, "price": v / 10, "stock": v, "version": v} for v in versions])
    body = service.product(product)
    assert (body["price"], body["stock"], body["version"]) == (30.0, 300, 300), body
    # Every event that arrived after a higher version was stale.
    expected_stale = sum(1 for i, v in enumerate(versions) if v < max(versions[: i + 1]))
    assert_stale_delta(service, stale_before, expected_stale)


# ---------------------------------------------------------------- 4. partial updates merge


def test_partial_updates_merge_in_any_combination(service):
    product = uid("partial")
    steps = [
        ({"stock": 10}, (None, 10)),
        ({"price": 2.5}, (2.5, 10)),
        ({"stock": 0}, (2.5, 0)),
        ({"price": 0}, (0, 0)),
        ({"price": 7, "stock": 70}, (7, 70)),
        ({"price": 8}, (8, 70)),
    ]
    for fields, (price, stock) in steps:
        post_ok(service, {"product_id": product, **fields})
        body = service.product(product)
        assert (body["price"], body["stock"]) == (price, stock), (fields, body)


# ---------------------------------------------------------------- 6. clear errors (see test_hostile.py)


def test_bad_item_is_named_and_nothing_applied(service):
    base = uid("clear")
    r = service.post([{"product_id": f"{base}-ok", "price": 1}, {"product_id": f"{base}-bad", "stock": 1.5}])
    body = assert_problem(r, 422)
    assert pointers(body) == {"/1/stock"}, body
    assert service.get(f"{base}-ok").status_code == 404


# ---------------------------------------------------------------- concurrency


def test_concurrent_versioned_writers_highest_version_wins(service):
    base = uid("race")
    products = [f"{base}-{k}" for k in range(3)]
    top = 150
    events = [(p, v) for p in products for v in range(1, top + 1)]
    random.Random(11).shuffle(events)
    n_threads = 8
    slices = [events[t::n_threads] for t in range(n_threads)]

    def client(chunk) -> None:
        for j in range(0, len(chunk), 3):
            batch = chunk[j : j + 3]
            # Mix single events and small bulk requests.
            body = [{"product_id": p, "price": v / 2, "stock": v, "version": v} for p, v in batch]
            post_ok(service, body if len(body) > 1 else body[0])

    stale_before = service.metric_sum("productd_events_stale_total")
    run_threads(client, [(s,) for s in slices], workers=n_threads)
    for p in products:
        body = service.product(p)
        assert (body["version"], body["stock"], body["price"]) == (top, top, top / 2), (p, body)
    stale = service.metric_sum("productd_events_stale_total") - stale_before
    assert 0 <= stale < len(events)


def test_concurrent_clients_many_products_last_event_of_owner_wins(service):
    base = uid("many")
    n_threads, per_thread, rounds = 8, 12, 6

    def client(t: int) -> None:
        mine = [f"{base}-{t}-{k}" for k in range(per_thread)]
        for r in range(rounds):
            if r % 2:
                post_ok(service, [{"product_id": p, "stock": r, "price": t + r / 10} for p in mine])
            else:
                for p in mine:
                    post_ok(service, {"product_id": p, "stock": r, "price": t + r / 10})

    run_threads(client, [(t,) for t in range(n_threads)], workers=n_threads)
    last = rounds - 1
    for t in range(n_threads):
        for k in range(per_thread):
            body = service.product(f"{base}-{t}-{k}")
            assert (body["stock"], body["price"]) == (last, t + last / 10), body
