"""The HTTP API's happy paths and the shape of every answer, against a real productd."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import requests
from service import SHARD_SERIES, TIMEOUT, assert_problem, children, parse_metrics, raw_request, uid

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
PRODUCT_KEYS = {"product_id", "price", "stock", "version", "updated_at", "created_at", "etag",
                "user_id", "name", "description", "images"}  # a bare product: the catalogue fields null or []


def parse_ts(value: str) -> datetime:
    assert isinstance(value, str) and RFC3339_UTC.match(value), f"not RFC 3339 UTC with Z: {value!r}"
    head, _, frac = value[:-1].partition(".")
    ts = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    if frac:
        ts += timedelta(microseconds=int(frac[:6].ljust(6, "0")))
    return ts


def test_single_event_roundtrip(service):
    pid = uid("single")
    r = service.post({"product_id": pid, "price": 49.99, "stock": 100})
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1}
    body = service.product(pid)
    assert body["product_id"] == pid
    assert body["price"] == 49.99
    assert body["stock"] == 100
    assert body["version"] is None


def test_every_response_names_its_worker_and_request(service):
    pid = uid("hdr")
    responses = [
        service.post({"product_id": pid, "stock": 1}),
        service.get(pid),
        service.get(uid("missing")),
        requests.get(service.url + "/healthz", timeout=TIMEOUT),
        requests.get(service.url + "/readyz", timeout=TIMEOUT),
        requests.get(service.url + "/metrics", timeout=TIMEOUT),
        requests.put(service.url + "/events", timeout=TIMEOUT),
        service.post_raw(b"{", "application/json"),
    ]
    workers = set(service.worker_pids())
    for r in responses:
        w = r.headers.get("X-Productd-Worker")
        assert w is not None and w.isdigit(), (r.request.method, r.url, r.status_code, dict(r.headers))
        assert int(w) in workers, f"X-Productd-Worker {w} is not a gunicorn worker {workers}"
        assert r.headers.get("X-Request-ID"), (r.request.method, r.url, dict(r.headers))
    assert len({r.headers["X-Request-ID"] for r in responses}) == len(responses), "request ids repeat"


def test_bulk_array(service):
    base = uid("bulk")
    events = [{"product_id": f"{base}-{i}", "price": i + 0.5, "stock": i} for i in range(25)]
    r = service.post(events)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 25}
    for i in range(25):
        body = service.product(f"{base}-{i}")
        assert (body["price"], body["stock"]) == (i + 0.5, i)


def test_ndjson_with_blank_lines(service):
    base = uid("nd")
    lines = [
        f'{{"product_id": "{base}-a", "price": 1.25}}',
        "",
        f'{{"product_id": "{base}-b", "stock": 7, "version": 3}}',
        "   ",
        f'{{"product_id": "{base}-a", "stock": 2}}',
    ]
    r = service.post_raw(("\n".join(lines) + "\n").encode(), "application/x-ndjson")
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 3}
    a, b = service.product(f"{base}-a"), service.product(f"{base}-b")
    assert (a["price"], a["stock"], a["version"]) == (1.25, 2, None)
    assert (b["price"], b["stock"], b["version"]) == (None, 7, 3)


def test_chunked_request_body(service):
    """HTTP/1.1 clients may stream a body without Content-Length (Transfer-Encoding: chunked)."""
    base = uid("chunked")
    chunks = [b'[{"product_id": "', base.encode(), b'-a", "stock": 3},', b'{"product_id": "', base.encode(),
              b'-b", "price": 1.5}]']
    status, _, data = raw_request(service.port, "POST", "/events", chunks, {"Content-Type": "application/json"},
                                  chunked=True)
    assert status == 202, data
    assert service.product(f"{base}-a")["stock"] == 3
    assert service.product(f"{base}-b")["price"] == 1.5


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "application/json;charset=UTF-8"])
def test_json_with_charset(service, ctype):
    pid = uid("cs")
    r = service.post_raw(f'{{"product_id": "{pid}", "stock": 5}}'.encode(), ctype)
    assert r.status_code == 202, r.text
    assert service.product(pid)["stock"] == 5


def test_get_shape_and_updated_at(service):
    pid = uid("shape")
    before = datetime.now(UTC)
    assert service.post({"product_id": pid, "price": 3, "stock": 4, "version": 9}).status_code == 202
    r = service.get(pid)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert set(body) == PRODUCT_KEYS
    assert body["product_id"] == pid
    assert body["price"] == 3 and isinstance(body["price"], (int, float)) and not isinstance(body["price"], bool)
    assert body["stock"] == 4 and type(body["stock"]) is int
    assert body["version"] == 9 and type(body["version"]) is int
    first = parse_ts(body["updated_at"])
    # Same machine, same clock: a sanity bound (an hour), not a timing assertion.
    assert before - timedelta(hours=1) < first < before + timedelta(hours=1)

    assert service.post({"product_id": pid, "stock": 5}).status_code == 202
    second = parse_ts(service.product(pid)["updated_at"])
    assert second >= first


def test_boundary_values_accepted(service):
    base = uid("edge")
    long_id = (base + "-" + "x" * 128)[:128]
    odd_id = f"{base}-AZaz09-._~:@"
    events = [
        {"product_id": f"{base}-0", "price": 0, "stock": 0, "version": 0},
        {"product_id": f"{base}-max", "stock": 2**63 - 1, "version": 2**63 - 1},
        {"product_id": long_id, "price": 1e300},
        {"product_id": odd_id, "price": 0.01, "version": None},
    ]
    r = service.post(events)
    assert r.status_code == 202, r.text
    zero = service.product(f"{base}-0")
    assert (zero["price"], zero["stock"], zero["version"]) == (0, 0, 0)
    big = service.product(f"{base}-max")
    assert (big["stock"], big["version"]) == (2**63 - 1, 2**63 - 1)
    assert len(long_id) == 128 and service.product(long_id)["price"] == 1e300
    odd = service.product(odd_id)
    assert odd["product_id"] == odd_id and odd["price"] == 0.01 and odd["version"] is None


def test_integral_floats_are_integers(service):
    """JSON has one number type: 1e2 and 7.0 are the integers 100 and 7 (exact up to 2**53)."""
    pid = uid("intfloat")
    status, _, data = raw_request(
        service.port, "POST", "/events",
        f'{{"product_id": "{pid}", "stock": 1e2, "version": 7.0}}'.encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 202, data
    product = service.product(pid)
    assert product["stock"] == 100 and isinstance(product["stock"], int)
    assert product["version"] == 7 and isinstance(product["version"], int)


def test_unknown_product_404(service):
    r = service.get(uid("nobody"))
    assert_problem(r, 404)


def test_partial_updates_merge(service):
    pid = uid("merge")
    assert service.post({"product_id": pid, "price": 10.5}).status_code == 202
    first = service.product(pid)
    assert (first["price"], first["stock"]) == (10.5, None)
    assert service.post({"product_id": pid, "stock": 3}).status_code == 202
    second = service.product(pid)
    assert (second["price"], second["stock"]) == (10.5, 3)
    assert service.post({"product_id": pid, "price": 0}).status_code == 202
    third = service.product(pid)
    assert (third["price"], third["stock"]) == (0, 3)


def test_healthz(service):
    r = requests.get(service.url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_shape(service):
    r = requests.get(service.url + "/readyz", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    shards = body["shards"]
    assert [s["id"] for s in shards] == [0, 1, 2, 3]
    for s in shards:
        assert {"id", "pid", "alive", "ready", "inbox_bytes", "restarts", "state_lost"} <= set(s), s
        assert type(s["pid"]) is int and s["pid"] > 0
        assert s["alive"] is True and s["ready"] is True
        assert type(s["inbox_bytes"]) is int and s["inbox_bytes"] >= 0
        assert s["restarts"] == 0
        assert not s["state_lost"]
    pids = [s["pid"] for s in shards]
    assert len(set(pids)) == 4
    # The shards are the supervisor's children, not gunicorn's.
    assert set(pids) <= set(children(service.pid))


def test_metrics_series(service):
    pid = uid("metric")
    before = service.metric_sum("productd_events_applied_total")
    assert service.post([{"product_id": pid, "stock": i} for i in range(3)]).status_code == 202
    service.product(pid)  # read-your-writes: all three applied once this answers
    service.wait_for(lambda: service.metric_sum("productd_events_applied_total") - before >= 3,
                     "the applied counter to count 3 events", 10)
    r = requests.get(service.url + "/metrics", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    m = parse_metrics(r.text)
    for name in SHARD_SERIES:
        for shard in "0123":
            assert (name, shard) in m, f"{name}{{shard={shard!r}}} missing from /metrics"
    for shard in "0123":
        assert m[("productd_shard_up", shard)] == 1
    after = sum(v for (n, _), v in m.items() if n == "productd_events_applied_total")
    assert after - before >= 3


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("PUT", "/events", {"POST"}),
        ("DELETE", "/events", {"POST"}),
        ("PATCH", "/events", {"POST"}),
        ("GET", "/events", {"POST"}),
        ("POST", "/products/abc", {"GET", "PUT", "PATCH", "DELETE"}),
        ("PUT", "/products", {"GET", "POST"}),
        ("DELETE", "/products", {"GET", "POST"}),
        ("POST", "/products/abc/inventory", {"GET"}),
        ("POST", "/healthz", {"GET"}),
        ("POST", "/readyz", {"GET"}),
        ("DELETE", "/metrics", {"GET"}),
    ],
)
def test_405_with_allow(service, method, path, allowed):
    r = requests.request(method, service.url + path, timeout=TIMEOUT)
    assert_problem(r, 405)
    allow = {m.strip().upper() for m in r.headers.get("Allow", "").split(",") if m.strip()}
    assert allowed <= allow, f"Allow: {r.headers.get('Allow')!r}"
    assert method not in allow


@pytest.mark.parametrize(
    "method, path, body, headers, status",
    [
        ("POST", "/events", b"{", {"Content-Type": "application/json"}, 400),
        ("POST", "/events", b"[]", {"Content-Type": "application/json"}, 400),
        ("POST", "/events", b"", {"Content-Type": "application/json"}, 400),
        ("POST", "/events", b'{"product_id": "a"}', {"Content-Type": "application/json"}, 422),
        ("POST", "/events", b'{"product_id": "a", "stock": 1}', {"Content-Type": "text/plain"}, 415),
        ("POST", "/events", b'{"product_id": "a", "stock": 1}', {}, 415),
        ("GET", "/products/does-not-exist-" + "z" * 20, None, {}, 404),
        ("GET", "/nope", None, {}, 404),
        ("GET", "/products/..", None, {}, 400),
        ("PUT", "/events", None, {}, 405),
    ],
)
def test_problem_shape_on_errors(service, method, path, body, headers, status):
    resp = raw_request(service.port, method, path, body, headers)
    problem = assert_problem(resp, status)
    assert resp[1].get("x-productd-worker"), resp[1]
    if status == 422:
        assert problem["errors"], problem  # assert_problem checked that each error has a pointer


def test_keep_alive_connections_are_spread_over_the_workers(service):
    """Each worker has its own SO_REUSEPORT socket, so 32 kept-alive connections cannot all land on
    one worker (with one shared socket, a busy worker can take them all and the other idles).
    Kernel hashing of 32 connections over 2 sockets puts 29 or more on one side with probability
    about 2.5e-6."""
    conns = [http.client.HTTPConnection("127.0.0.1", service.port, timeout=30) for _ in range(32)]
    try:
        for conn in conns:
            conn.connect()
        served_by = []
        for conn in conns:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            served_by.append(resp.getheader("X-Productd-Worker"))
    finally:
        for conn in conns:
            conn.close()
    counts = sorted(served_by.count(pid) for pid in set(served_by))
    assert len(counts) == 2, counts
    assert counts[-1] <= 28, counts


def test_a_second_instance_on_the_same_port_is_refused(service, tmp_path):
    """SO_REUSEPORT must not let a second productd join the first one's port and share its traffic."""
    proc = subprocess.run(
        [sys.executable, "-m", "productd", "serve", "--bind", f"127.0.0.1:{service.port}",
         "--durability", "none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "cannot listen on" in proc.stderr and "in use" in proc.stderr.lower()
    assert requests.get(f"{service.url}/healthz", timeout=TIMEOUT).status_code == 200
