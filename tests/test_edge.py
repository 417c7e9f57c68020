"""The HTTP edge under clients that misbehave at the HTTP level (issue 11).

Slow and idle connections, bodies sent whole before reading, malformed chunked framing, what the
server refuses before the application sees a request, HEAD, a late shard reply, worker recycling
under load and a front end left behind by a dead supervisor. Every test starts the real service;
every wait has a generous deadline so that a hang fails, and no test asserts a duration.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest
import requests
from service import TIMEOUT, alive, assert_problem, uid

MAX_BODY = 4 * 1024 * 1024


# ---------------------------------------------------------------- helpers


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, deadline: float = 30.0) -> tuple[int | None, dict, bytes]:
    """(status, headers, body) of one response, or (None, {}, b"") if the server closed without one.

    Reads until the body given by Content-Length is complete or the server closes.
    """
    sock.settimeout(deadline)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    if b"\r\n\r\n" not in data:
        assert not data, f"a partial response: {data[:300]!r}"
        return None, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    try:
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return status, headers, body


def exchange(port: int, raw: bytes, half_close: bool = False, deadline: float = 30.0):
    """Send `raw` on a new connection and read one response (status None: closed without one)."""
    with connect(port) as sock:
        try:
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(sock, deadline)


def event_body(product: str) -> bytes:
    return json.dumps({"product_id": product, "price": 1.5}).encode()


def chunked_head(path: str = "/events") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()


def problem_of(status: int, headers: dict, body: bytes) -> dict:
    return assert_problem((status, headers, body), status)


# ---------------------------------------------------------------- a shared service


@pytest.fixture(scope="module")
def edge(start_service_module):
    return start_service_module


@pytest.fixture(scope="module")
def start_service_module(tmp_path_factory):
    from service import Productd

    svc = Productd(tmp_path_factory.mktemp("edge"), shards=2, workers=2,
                   extra_args=["--body-timeout", "2", "--header-timeout", "3"])
    svc.start()
    try:
        yield svc
        assert svc.stop(signal.SIGTERM) == 0, svc.log_tail()
    finally:
        svc.kill()


# ---------------------------------------------------------------- bodies sent whole before reading


def test_http_client_sending_a_whole_oversized_body_reads_the_413(edge):
    """Issue 11: a 20 MiB body from http.client used to end in BrokenPipeError."""
    product = uid("whole")
    pad = b"x" * (20 * 1024 * 1024)
    body = b'{"product_id": "' + product.encode() + b'", "price": 1, "pad": "' + pad + b'"}'
    conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=60)
    try:
        conn.request("POST", "/events", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        problem = assert_problem((resp.status, {k.lower(): v for k, v in resp.getheaders()}, data), 413)
        assert "--max-body-bytes" in problem["detail"], problem
    finally:
        conn.close()
    assert edge.get(product).status_code == 404


def test_requests_sending_a_whole_oversized_chunked_body_reads_the_413(edge):
    product = uid("wholechunk")

    def chunks():
        yield b'{"product_id": "' + product.encode() + b'", "price": 1, "pad": "'
        for _ in range(MAX_BODY // 65536 * 3):
            yield b"x" * 65536
        yield b'"}'

    r = requests.post(edge.url + "/events", data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT)
    assert_problem(r, 413)
    assert edge.get(product).status_code == 404


def test_expect_100_continue_with_too_large_length_gets_413_without_100(edge):
    head = (f"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY * 2}\r\nExpect: 100-continue\r\n\r\n").encode()
    with connect(edge.port) as sock:
        sock.sendall(head)
        status, headers, body = read_response(sock)
    assert status == 413, (status, body[:300])
    problem_of(status, headers, body)


def test_expect_100_continue_within_the_limit_is_continued_and_applied(edge):
    product = uid("expect")
    body = event_body(product)
    head = (f"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
    with connect(edge.port) as sock:
        sock.sendall(head)
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 100"), first
        sock.sendall(body)
        status, _, data = read_response(sock)
    assert status == 202, data
    assert edge.product(product)["price"] == 1.5


# ---------------------------------------------------------------- chunked framing errors


def _assert_refused_or_closed(edge, status, headers, body, product: str | None = None) -> None:
    assert status is None or 400 <= status < 500, (status, body[:300])
    if status is not None:
        problem_of(status, headers, body)
    if product is not None:
        assert edge.get(product).status_code == 404, f"{product} was applied from a broken body"


FRAMING = {
    "size-zz": lambda p: b"zz\r\n" + event_body(p) + b"\r\n0\r\n\r\n",
    "size-negative": lambda p: b"-5\r\n" + event_body(p) + b"\r\n0\r\n\r\n",
    "missing-crlf-after-data": lambda p: b"%x\r\n" % len(event_body(p)) + event_body(p) + b"XX0\r\n\r\n",
    "more-data-than-size": lambda p: b"3\r\n" + event_body(p) + b"\r\n0\r\n\r\n",
    "bad-trailer": lambda p: b"%x\r\n" % len(event_body(p)) + event_body(p) + b"\r\n0\r\nno colon here\r\n\r\n",
    "huge-size-overflow": lambda p: b"ffffffffffffffffffffffff\r\n" + event_body(p) + b"\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_malformed_chunked_body_is_a_4xx_or_a_close_never_5xx(edge, name):
    product = uid(name)
    status, headers, body = exchange(edge.port, chunked_head() + FRAMING[name](product))
    _assert_refused_or_closed(edge, status, headers, body, product)


def test_eof_before_the_last_chunk_applies_nothing(edge):
    product = uid("eof")
    data = event_body(product)
    status, headers, body = exchange(edge.port, chunked_head() + b"%x\r\n" % len(data) + data + b"\r\n",
                                     half_close=True)
    _assert_refused_or_closed(edge, status, headers, body, product)


def test_stalled_last_chunk_gets_408_at_the_body_timeout(edge):
    """The service runs with --body-timeout 2; the socket waits up to 30 s (hang detection only)."""
    product = uid("stall")
    data = event_body(product)
    with connect(edge.port) as sock:
        sock.sendall(chunked_head() + b"%x\r\n" % len(data) + data + b"\r\n")  # and never the last chunk
        status, headers, body = read_response(sock)
    assert status == 408, (status, body[:300])
    assert "--body-timeout" in problem_of(status, headers, body)["detail"]
    assert edge.get(product).status_code == 404


def test_huge_chunk_size_then_silence_gets_408(edge):
    product = uid("hugestall")
    with connect(edge.port) as sock:
        sock.sendall(chunked_head() + b"fffffffffff\r\n" + event_body(product)[:10])
        status, headers, body = read_response(sock)
    assert status in (408, 413), (status, body[:300])
    problem_of(status, headers, body)
    assert edge.get(product).status_code == 404


def test_stalled_content_length_body_gets_408(edge):
    with connect(edge.port) as sock:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"product_id\":")
        status, headers, body = read_response(sock)
    assert status == 408, (status, body[:300])
    problem_of(status, headers, body)


# ---------------------------------------------------------------- what the server refuses itself


REFUSED = {
    "bad-request-line": (b"GARBAGE\r\n\r\n", (400,)),
    "missing-host-http11": (b"GET /healthz HTTP/1.1\r\n\r\n", (400,)),
    "oversized-header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", (431,)),
    "too-many-headers": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
                         + b"\r\n", (431,)),
    "long-target": (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", (414,)),
    "unsupported-transfer-encoding": (b"POST /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
                                      (400, 501)),
    "chunked-not-last": (b"POST /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
                         (400, 501)),
    "two-content-lengths": (b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"
                            b"abcd", (400,)),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_the_server_refuses_with_a_problem(edge, name):
    raw, expected = REFUSED[name]
    status, headers, body = exchange(edge.port, raw)
    assert status in expected, (name, status, body[:300])
    problem_of(status, headers, body)


def test_http10_without_host_is_served(edge):
    status, _, body = exchange(edge.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 200, body


# ---------------------------------------------------------------- HEAD


def test_head_works_on_every_get_route(edge):
    product = uid("head")
    assert edge.post({"product_id": product, "stock": 3}).status_code == 202
    for path, code in [("/healthz", 200), ("/readyz", 200), ("/metrics", 200), ("/openapi.json", 200),
                       (f"/products/{product}", 200), (f"/products/{uid('nohead')}", 404)]:
        got = requests.get(edge.url + path, timeout=TIMEOUT)
        head = requests.head(edge.url + path, timeout=TIMEOUT)
        assert (got.status_code, head.status_code) == (code, code), path
        assert head.content == b"", path
        assert head.headers.get("Content-Type") == got.headers.get("Content-Type"), path


# ---------------------------------------------------------------- slow and idle clients


def _normal_requests_answered(svc, count: int, product: str) -> list[int]:
    codes = []
    for _ in range(count):
        codes.append(requests.get(f"{svc.url}/products/{product}", timeout=(5, 10)).status_code)
    return codes


def test_slowloris_does_not_stop_normal_requests_and_slow_heads_are_cut(edge):
    """300 connections each trickling one header line a second (the service: --header-timeout 3)."""
    product = uid("loris")
    assert edge.post({"product_id": product, "price": 1}).status_code == 202
    slow = []
    for _ in range(300):
        sock = connect(edge.port)
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append(sock)
    cut: set[int] = set()
    stop = threading.Event()

    def trickle() -> None:
        n = 0
        while not stop.is_set() and len(cut) < len(slow):
            for i, sock in enumerate(slow):
                if i in cut:
                    continue
                try:
                    sock.sendall(b"X-Slow-%d: 1\r\n" % n)
                except OSError:
                    cut.add(i)
            n += 1
            stop.wait(1.0)

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        codes = _normal_requests_answered(edge, 20, product)
        assert codes == [200] * 20, codes
        # Hang detection only: each slow head is answered 408 and closed after --header-timeout.
        end = time.monotonic() + 60
        while len(cut) < len(slow) and time.monotonic() < end:
            time.sleep(0.2)
        assert len(cut) == len(slow), f"{len(slow) - len(cut)} slow heads still open"
    finally:
        stop.set()
        trickler.join(10)
        for sock in slow:
            sock.close()
    one = connect(edge.port)
    one.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    status, headers, body = read_response(one)
    one.close()
    assert status == 408, (status, body)
    problem_of(status, headers, body)


def test_idle_flood_does_not_stop_normal_requests(start_service):
    """3,000 connections opened and left idle against 2 workers of at most 1,000 connections each."""
    svc = start_service(shards=1, workers=2, extra_args=["--header-timeout", "30"])
    product = uid("idle")
    assert svc.post({"product_id": product, "price": 1}).status_code == 202
    idle = []
    try:
        for _ in range(3000):
            idle.append(socket.create_connection(("127.0.0.1", svc.port), timeout=30))
        codes = _normal_requests_answered(svc, 20, product)
        assert codes == [200] * 20, codes
        # Past --max-connections the connections idle the longest were closed, so the workers hold
        # at most their bound.
        closed = 0
        for sock in idle:
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed += 1
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        assert closed >= 3000 - 2 * 1000 - 50, closed  # a few may still wait in the accept queue
    finally:
        for sock in idle:
            sock.close()
    assert svc.readyz().status_code == 200


def test_an_idle_connection_is_closed_after_the_header_timeout(edge):
    with connect(edge.port) as sock:
        status, _, _ = read_response(sock)  # nothing sent: the server closes without answering
    assert status is None


# ---------------------------------------------------------------- a late reply


def test_a_reply_after_its_read_timed_out_is_dropped_and_counted(start_service):
    svc = start_service(shards=1, workers=1, extra_args=["--read-timeout", "0.5"])
    product = uid("late")
    assert svc.post({"product_id": product, "stock": 4}).status_code == 202
    assert svc.metric_sum("productd_late_replies_total") == 0
    (shard,) = svc.shard_pids()
    os.kill(shard, signal.SIGSTOP)
    try:
        r = svc.get(product)
        body = assert_problem(r, 504)
        assert "--read-timeout" in body["detail"]
    finally:
        os.kill(shard, signal.SIGCONT)
    # The stopped shard answers the queued read once it runs again; nobody waits for it any more.
    svc.wait_for(lambda: svc.metric_sum("productd_late_replies_total") == 1, "the late reply to be counted")
    assert svc.product(product)["stock"] == 4  # and the next read gets its own answer
    assert svc.metric_sum("productd_late_replies_total") == 1


# ---------------------------------------------------------------- recycling under load


def test_recycling_workers_under_load_loses_no_reply(start_service, tmp_path):
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("max_requests = 150\nmax_requests_jitter = 30\n")
    svc = start_service(shards=2, workers=2, extra_args=["--gunicorn-config", str(conf)])
    first_workers = set(svc.worker_pids())
    base = uid("recycle")
    lock = threading.Lock()
    answers: dict[str, int] = {}
    errors: list[str] = []

    def client(t: int) -> None:
        session = requests.Session()
        for n in range(150):
            product = f"{base}-{t}-{n}"
            try:
                r = session.post(svc.url + "/events", json={"product_id": product, "stock": n}, timeout=TIMEOUT)
                g = session.get(f"{svc.url}/products/{product}", timeout=TIMEOUT)
            except requests.RequestException as e:
                with lock:
                    errors.append(f"{product}: {e!r}")
                return
            with lock:
                answers[product] = r.status_code
                if g.status_code != 200 or g.json()["stock"] != n:
                    errors.append(f"{product}: read {g.status_code} {g.text[:200]}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(180)
        assert not th.is_alive(), "a client hung"
    assert not errors, errors[:5]
    assert len(answers) == 900 and set(answers.values()) == {202}, set(answers.values())
    assert not first_workers & set(svc.worker_pids()), "no worker was recycled"
    assert "max_requests reached" in svc.log_text()


# ---------------------------------------------------------------- the supervisor gone


def test_front_end_left_behind_by_a_dead_supervisor_answers_503_and_exits(start_service):
    svc = start_service(shards=2, workers=2, extra_args=["--graceful-timeout", "120"])
    product = uid("orphaned")
    assert svc.post({"product_id": product, "stock": 1}).status_code == 202
    workers = svc.worker_pids()
    arbiter = svc.arbiter_pids()
    shards = svc.shard_pids()
    session = requests.Session()  # a kept-alive connection reaches a worker that is still there
    assert session.get(f"{svc.url}/products/{product}", timeout=TIMEOUT).status_code == 200
    os.killpg(svc.pid, signal.SIGKILL)  # the supervisor and its shards; gunicorn has its own group
    svc.wait_for(lambda: not any(alive(p) for p in [svc.pid, *shards]), "the supervisor and shards to die")
    codes = []
    for n in range(20):
        try:
            r = session.post(svc.url + "/events", json={"product_id": f"{product}-{n}", "stock": 1}, timeout=TIMEOUT)
            codes.append(r.status_code)
            if r.status_code == 503:
                assert_problem(r, 503)
            g = session.get(f"{svc.url}/products/{product}", timeout=TIMEOUT)
            codes.append(g.status_code)
        except requests.ConnectionError:
            codes.append("closed")
    assert 202 not in codes and 200 not in codes and not any(isinstance(c, int) and c >= 500 and c != 503
                                                              for c in codes), codes
    # Hang detection only, well inside the 120 s graceful timeout it must not wait out.
    end = time.monotonic() + 30
    while any(alive(p) for p in [*workers, *arbiter]) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(alive(p) for p in [*workers, *arbiter]), "the front end outlived its supervisor"


def test_a_burst_of_replies_beyond_the_datagram_queue_is_not_dropped(start_service):
    """Linux queues at most net.unix.max_dgram_qlen (default 10) datagrams on a Unix socket and a
    shard never waits: 40 reads waiting on one worker, answered in one burst, must all arrive."""
    svc = start_service(shards=1, workers=1, extra_args=["--read-timeout", "30"])
    product = uid("burst")
    assert svc.post({"product_id": product, "stock": 7}).status_code == 202
    (shard,) = svc.shard_pids()
    codes: list[int] = []
    lock = threading.Lock()

    def read() -> None:
        r = requests.get(f"{svc.url}/products/{product}", timeout=TIMEOUT)
        with lock:
            codes.append(r.status_code)

    os.kill(shard, signal.SIGSTOP)
    try:
        readers = [threading.Thread(target=read) for _ in range(40)]
        for th in readers:
            th.start()
        # Every read's frame waits in the stopped shard's inbox (each is more than 20 bytes).
        svc.wait_for(lambda: svc.readyz().json()["shards"][0]["inbox_bytes"] >= 40 * 20, "40 queued reads")
    finally:
        os.kill(shard, signal.SIGCONT)
    for th in readers:
        th.join(60)
        assert not th.is_alive(), "a reader hung"
    assert codes == [200] * 40, codes
    assert svc.metric_sum("productd_replies_dropped_total") == 0
