"""The service's log against the running service: one JSON object per line from every process,
request lines with their request id, restarts, stale summaries and the drain on stop."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid

import pytest
import requests
from service import TIMEOUT, Productd, ServiceError, raw_request, uid

DEADLINE = 30.0
STALE_SUMMARY_DEADLINE = 15.0  # a shard reports stale events at most every 10 s
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
LEVELS = {"debug", "info", "warning", "error", "critical"}
STALE_EVENTS = 7


def parse_lines(text: str) -> list[dict]:
    """Every line must be one JSON object with time, level, role and message."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), f"log line {number} is not an object: {line!r}"
        for key in ("time", "level", "role", "message"):
            assert key in entry, f"log line {number} has no {key!r}: {line!r}"
        assert TIME_RE.match(entry["time"]), f"log line {number}: time {entry['time']!r}"
        assert entry["level"] in LEVELS, f"log line {number}: level {entry['level']!r}"
        entries.append(entry)
    return entries


def wait_entries(svc: Productd, predicate, what: str, deadline: float = DEADLINE) -> list[dict]:
    """Poll the log until some entries match `predicate`; returns them."""
    end = time.monotonic() + deadline
    while True:
        found = [e for e in _entries_so_far(svc) if predicate(e)]
        if found:
            return found
        if time.monotonic() > end:
            raise ServiceError(f"no log line with {what} within {deadline}s\n{svc.log_tail()}")
        time.sleep(0.1)


def _entries_so_far(svc: Productd) -> list[dict]:
    out = []
    for line in svc.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line still being written; parse_lines checks every line at the end
        if isinstance(entry, dict):
            out.append(entry)
    return out


class Logged:
    """A JSON-logging service shared by the tests of this module; stopped once, by the last tests."""

    def __init__(self, svc: Productd) -> None:
        self.svc = svc
        self.stopped_code: int | None = None

    def stop(self) -> list[dict]:
        if self.stopped_code is None:
            self.stopped_code = self.svc.stop(signal.SIGTERM)
        return parse_lines(self.svc.log_text())


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    svc = Productd(tmp_path_factory.mktemp("logs"), shards=2, workers=2, extra_args=["--log-format", "json"])
    svc.start()
    try:
        # Stale events first, so that the shard's 10 s summary is due while the other tests run.
        pid = uid("stale")
        assert svc.post({"product_id": pid, "price": 1, "version": 10}).status_code == 202
        svc.wait_for(lambda: svc.get(pid).status_code == 200, "the versioned event applied")
        stale = [{"product_id": pid, "price": 2, "version": v} for v in range(1, STALE_EVENTS + 1)]
        assert svc.post(stale).status_code == 202
        yield Logged(svc)
    finally:
        svc.kill()


def request_lines(svc: Productd, rid: str) -> list[dict]:
    return wait_entries(svc, lambda e: e.get("request_id") == rid, f"request_id {rid!r}")


def test_4xx_request_logged_with_request_fields(logged):
    svc = logged.svc
    rid = "client-" + uuid.uuid4().hex
    r = svc.post({"product_id": uid(), "price": -1}, headers={"X-Request-ID": rid})
    assert r.status_code == 422
    assert r.headers["X-Request-ID"] == rid
    (entry,) = request_lines(svc, rid)
    assert entry["method"] == "POST"
    assert entry["path"] == "/events"
    assert entry["status"] == 422
    assert isinstance(entry["duration_ms"], (int, float)) and entry["duration_ms"] >= 0
    assert entry["role"] == "worker"
    assert entry["level"] in ("info", "warning")


def test_404_logged_and_generated_request_id_matches(logged):
    svc = logged.svc
    r = svc.get(uid("missing"))
    assert r.status_code == 404
    rid = r.headers["X-Request-ID"]
    assert 1 <= len(rid) <= 128
    (entry,) = request_lines(svc, rid)
    assert entry["status"] == 404 and entry["method"] == "GET" and entry["path"].startswith("/products/")


@pytest.mark.parametrize(
    "bad_id",
    ["x" * 129, "tab\there", "caf\u00e9-id"],
    ids=["129-chars", "control-char", "non-ascii"],
)
def test_unacceptable_request_id_is_replaced(logged, bad_id):
    svc = logged.svc
    code, headers, _ = raw_request(svc.port, "GET", f"/products/{uid('nope')}", headers={"X-Request-ID": bad_id})
    assert code == 404
    rid = headers["x-request-id"]
    assert rid != bad_id
    assert 1 <= len(rid) <= 128 and rid.isascii() and rid.isprintable(), rid
    (entry,) = request_lines(svc, rid)
    assert entry["status"] == 404
    assert bad_id not in svc.log_text()


def test_128_char_request_id_is_kept(logged):
    svc = logged.svc
    rid = ("k" + uuid.uuid4().hex) * 4
    rid = rid[:128]
    r = requests.get(f"{svc.url}/products/{uid('nope')}", headers={"X-Request-ID": rid}, timeout=TIMEOUT)
    assert r.headers["X-Request-ID"] == rid
    request_lines(svc, rid)


def test_successful_requests_not_logged_without_access_log(logged):
    svc = logged.svc
    rid = "quiet-" + uuid.uuid4().hex
    assert requests.get(svc.url + "/healthz", headers={"X-Request-ID": rid}, timeout=TIMEOUT).status_code == 200
    marker = "marker-" + uuid.uuid4().hex  # a later 4xx line proves the worker's output has been written
    requests.get(f"{svc.url}/products/{uid()}", headers={"X-Request-ID": marker}, timeout=TIMEOUT)
    request_lines(svc, marker)
    assert rid not in svc.log_text()


def test_stale_events_summarised_per_shard(logged):
    svc = logged.svc

    def counted() -> int:
        return sum(int(e.get("stale", 0)) for e in _entries_so_far(svc) if e.get("role", "").startswith("shard-"))

    end = time.monotonic() + STALE_SUMMARY_DEADLINE
    while counted() < STALE_EVENTS and time.monotonic() < end:
        time.sleep(0.2)
    summaries = [e for e in _entries_so_far(svc) if "stale" in e]
    assert counted() == STALE_EVENTS, f"stale summaries: {summaries}\n{svc.log_tail()}"
    for e in summaries:
        assert e["role"] == f"shard-{e['shard']}", e
        assert str(e["stale"]) in e["message"], e
    # a summary, not one line per event
    assert len(summaries) < STALE_EVENTS


def test_shard_restart_logged_as_error_with_shard_id(logged):
    svc = logged.svc
    victim = svc.shard_pids()[1]
    os.kill(victim, signal.SIGKILL)
    (entry,) = wait_entries(svc, lambda e: e["level"] == "error" and str(victim) in e["message"],
                            f"an error about shard pid {victim}")
    assert entry["role"] == "supervisor"
    assert re.search(r"\bshard 1\b", entry["message"]) or entry.get("shard") == 1, entry
    svc.wait_ready()


def test_sigterm_logs_the_drain(logged):
    entries = logged.stop()
    assert logged.stopped_code == 0
    messages = [(e["role"], e["message"]) for e in entries]
    stopping = [i for i, (role, m) in enumerate(messages) if role == "supervisor" and "SIGTERM" in m]
    assert stopping, messages[-20:]
    after = messages[stopping[0]:]
    for shard in range(logged.svc.shards):
        assert any(role == f"shard-{shard}" and "drain" in m for role, m in after), (shard, after)
    assert any(role == "supervisor" and "stopped" in m for role, m in after), after


def test_every_line_is_one_json_object_from_every_role(logged):
    entries = logged.stop()
    roles = {e["role"] for e in entries}
    expected = {"supervisor", "arbiter", "worker"} | {f"shard-{i}" for i in range(logged.svc.shards)}
    assert expected <= roles, roles


def test_role_matches_the_process_that_logged(logged):
    """A line's role names the process that wrote it (pid): an operator filters on it."""
    entries = logged.stop()
    svc = logged.svc
    expected = {svc.pid: "supervisor"}
    for e in entries:
        m = re.match(r"(shard|image worker) (\d+) started as pid (\d+)", e["message"])
        if m and e["role"] == "supervisor":
            role = "shard" if m.group(1) == "shard" else "image-worker"
            expected[int(m.group(3))] = f"{role}-{m.group(2)}"
        m = re.match(r"gunicorn arbiter started as pid (\d+)", e["message"])
        if m:
            expected[int(m.group(1))] = "arbiter"
    wrong = [e for e in entries if "pid" in e and e["role"] != expected.get(e["pid"], "worker")]
    assert not wrong, f"{len(wrong)} lines name the wrong role, e.g. {wrong[:3]}"


def test_access_log_logs_every_request(start_service):
    svc = start_service(shards=1, workers=2, extra_args=["--access-log"])
    rids = []
    for i in range(6):
        rid = f"access-{i}-{uuid.uuid4().hex}"
        rids.append(rid)
        if i % 2:
            r = requests.get(svc.url + "/healthz", headers={"X-Request-ID": rid}, timeout=TIMEOUT)
        else:
            r = svc.post({"product_id": uid(), "price": 1}, headers={"X-Request-ID": rid})
        assert r.status_code in (200, 202)
    for i, rid in enumerate(rids):
        (entry,) = request_lines(svc, rid)
        assert entry["status"] == (200 if i % 2 else 202)
        assert entry["path"] == ("/healthz" if i % 2 else "/events")
        assert "duration_ms" in entry
    svc.stop()
    parse_lines(svc.log_text())


def test_text_format_is_not_json(start_service):
    svc = start_service(shards=1, workers=1, extra_args=["--log-format", "text"])
    rid = "text-" + uuid.uuid4().hex
    assert svc.get(uid(), headers={"X-Request-ID": rid}).status_code == 404
    assert svc.stop() == 0
    lines = [line for line in svc.log_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            continue
        raise AssertionError(f"JSON line with --log-format text: {line!r}")
    assert any(rid in line and "404" in line for line in lines), lines[-10:]
    assert any("supervisor" in line for line in lines)
