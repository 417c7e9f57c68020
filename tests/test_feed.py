"""GET /changes, the change feed (docs/feed.md), against the live service: the events checked
against the writes that produced them, reconnects with Last-Event-ID, 410 for a cursor older
than the history, the slow subscriber's cut-off, filters, and a shard killed -9 or a service
restarted with batch and sync durability. The ChangeLog's pure logic is at the end."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time

import pytest
import requests
from service import TIMEOUT, assert_problem, uid

from productd.store.changes import EXPIRED, LOST, OK, ChangeLog
from productd.store.record import pack_fields


class Feed:
    """One GET /changes connection, read event by event (`next`), with a timeout."""

    def __init__(self, svc, params: str = "", last_event_id: str | None = None, timeout: float = 20.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", "/changes" + (f"?{params}" if params else ""), headers=headers)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.last_id: str | None = last_event_id
        self.comments = 0

    def body(self) -> dict:
        return json.loads(self.resp.read())

    def next(self) -> dict | None:
        """The next event as {"id", "event", "data"}; None at the end of the stream."""
        event: dict = {}
        while True:
            line = self.resp.readline()
            if not line:
                return None
            line = line.rstrip(b"\n").decode()
            if not line:
                if "data" in event:
                    return event
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(": ")
            if name == "data":
                event["data"] = json.loads(value)
            else:
                event[name] = value
                if name == "id":
                    self.last_id = value

    def take(self, count: int, deadline: float = 20.0) -> list[dict]:
        got = []
        end = time.monotonic() + deadline
        while len(got) < count and time.monotonic() < end:
            event = self.next()
            if event is None:
                break
            got.append(event)
        return got

    def close(self) -> None:
        self.conn.close()


def get_changes(svc, **params) -> requests.Response:
    """GET /changes expecting a problem, not a stream (a stream is read for a moment only)."""
    resp = requests.get(svc.url + "/changes", params=params, timeout=TIMEOUT, stream=True)
    if resp.status_code == 200:
        resp.close()
    else:
        resp.content  # noqa: B018 - read the problem
    return resp


def post(svc, events) -> None:
    resp = requests.post(svc.url + "/events", json=events, timeout=TIMEOUT)
    assert resp.status_code == 202, resp.text


def changes_of(events: list[dict]) -> list[tuple[str, float, int]]:
    return [(e["data"]["product_id"], e["data"]["price"], e["data"]["stock"]) for e in events]


def test_no_cursor_starts_now_and_every_event_is_one_change_in_order(service):
    pid = uid("feed")
    post(service, [{"product_id": f"{pid}-old", "price": 1.0, "stock": 1}])
    feed = Feed(service)
    assert feed.status == 200 and feed.resp.getheader("Content-Type").startswith("text/event-stream")
    products = [f"{pid}-{i}" for i in range(8)]
    sent = []
    for round_ in range(5):
        batch = [{"product_id": p, "price": round_ + i / 10, "stock": round_} for i, p in enumerate(products)]
        post(service, batch)
        sent += [(e["product_id"], e["price"], e["stock"]) for e in batch]
    got = feed.take(len(sent))
    feed.close()
    assert all(e["event"] == "change" for e in got)
    assert sorted(changes_of(got)) == sorted(sent)  # each change exactly once, none from before
    for product in products:  # per-product order
        assert [c for c in changes_of(got) if c[0] == product] == [c for c in sent if c[0] == product]
    doc = got[0]["data"]
    assert set(doc) >= {"product_id", "price", "stock", "version", "updated_at", "etag"}


def test_reconnect_with_last_event_id_gets_the_rest_exactly_once(service):
    pid = uid("resume")
    feed = Feed(service, f"ids={','.join(f'{pid}-{i}' for i in range(4))}")
    sent = [(f"{pid}-{i % 4}", float(i), i) for i in range(40)]
    post(service, [{"product_id": p, "price": price, "stock": s} for p, price, s in sent[:20]])
    first = feed.take(7)
    feed.close()
    post(service, [{"product_id": p, "price": price, "stock": s} for p, price, s in sent[20:]])
    again = Feed(service, f"ids={','.join(f'{pid}-{i}' for i in range(4))}", last_event_id=first[-1]["id"])
    assert again.status == 200
    rest = again.take(len(sent) - 7)
    again.close()
    got = changes_of(first + rest)
    assert sorted(got) == sorted(sent)
    for i in range(4):
        assert [c for c in got if c[0] == f"{pid}-{i}"] == [c for c in sent if c[0] == f"{pid}-{i}"]
    # ?since= is the same as Last-Event-ID
    since = Feed(service, f"ids={pid}-0&since={first[-1]['id']}")
    assert since.status == 200
    assert changes_of(since.take(1))[0][0] == f"{pid}-0"
    since.close()


def test_filters_user_id_and_ids(service):
    pid = uid("filt")
    feed = Feed(service, f"ids={pid}-a,{pid}-c")
    post(service, [{"product_id": f"{pid}-{x}", "price": 1.0, "stock": 1} for x in "abcd"])
    got = feed.take(2)
    assert sorted(e["data"]["product_id"] for e in got) == [f"{pid}-a", f"{pid}-c"]
    feed.close()
    # user_id: bare products (events only) have no owner, so nothing; a catalogued one is delivered
    owned = Feed(service, f"user_id={pid}-owner", timeout=3)
    post(service, [{"product_id": f"{pid}-e", "price": 1.0, "stock": 1}])
    resp = requests.post(service.url + "/products", json={"product_id": f"{pid}-p", "user_id": f"{pid}-owner",
                                                          "name": "n"}, timeout=TIMEOUT)
    if resp.status_code in (404, 405):  # the catalogue routes are not on this branch yet
        with pytest.raises(socket.timeout):
            owned.next()
        owned.close()
        return
    assert resp.status_code == 201, resp.text
    [event] = owned.take(1)
    assert event["data"]["product_id"] == f"{pid}-p" and event["data"]["user_id"] == f"{pid}-owner"
    requests.delete(service.url + f"/products/{pid}-p", timeout=TIMEOUT)
    [gone] = owned.take(1)
    assert gone["event"] == "delete" and gone["data"] == {"product_id": f"{pid}-p", "deleted": True}
    owned.close()


@pytest.mark.parametrize("cursor", ["nope", "c1-4-1-2-3", "c1-3-0-0-0", "c1-x-1"])
def test_a_malformed_cursor_is_400(service, cursor):
    resp = get_changes(service, since=cursor)
    assert_problem(resp, 400)


@pytest.mark.parametrize("params", [{"ids": ",,"}, {"user_id": "a b"}, {"ids": ",".join(map(str, range(1001)))}])
def test_bad_filters_are_400(service, params):
    assert_problem(get_changes(service, **params), 400)


def test_an_idle_stream_gets_heartbeats(service):
    feed = Feed(service, f"ids={uid('idle')}", timeout=20)
    started = time.monotonic()
    line = feed.resp.readline()
    assert line == b": ping\n" and 10 < time.monotonic() - started < 19  # every ~15 s, nothing else
    feed.close()


def cursor_of(svc) -> str:
    """The cursor now: what an event would carry (the id of the first event after a write)."""
    pid = uid("probe")
    feed = Feed(svc, f"ids={pid}")
    post(svc, [{"product_id": pid, "price": 1.0, "stock": 1}])
    [event] = feed.take(1)
    feed.close()
    return event["id"]


def test_a_cursor_older_than_the_history_is_410_and_says_how_to_resync(start_service):
    svc = start_service(shards=2, workers=1, extra_args=["--change-history", "100"])
    old = cursor_of(svc)
    post(svc, [{"product_id": f"{uid('fill')}-{i}", "price": 1.0, "stock": i} for i in range(600)])
    resp = get_changes(svc, since=old)
    body = assert_problem(resp, 410)
    assert "GET /products" in body["detail"]
    # a cursor from another shard count is 400
    assert_problem(get_changes(svc, since="c1-3-0-0-0"), 400)


def test_a_slow_subscriber_is_cut_off_with_the_cursor_to_resume_from(start_service):
    svc = start_service(shards=1, workers=1, extra_args=["--change-history", "2000"])
    pid = uid("slow")
    feed = Feed(svc)  # and does not read while the changes come
    for round_ in range(40):
        post(svc, [{"product_id": f"{pid}-{i}", "price": float(round_), "stock": i,
                    "version": round_ + 1} for i in range(1000)])
    events = []
    end = time.monotonic() + 60
    while time.monotonic() < end and (event := feed.next()) is not None:
        events.append(event)
        if event["event"] == "cut-off":
            break
    assert feed.next() is None  # the stream ended after the cut-off
    feed.close()
    assert events[-1]["event"] == "cut-off", events[-1]
    data = events[-1]["data"]
    assert data["reason"] == "slow" and data["cursor"] == events[-1]["id"]
    assert len(events) - 1 < 40_000
    # the events it did get are each product's changes in order
    last: dict[str, float] = {}
    for event in events[:-1]:
        doc = event["data"]
        assert doc["price"] > last.get(doc["product_id"], -1)
        last[doc["product_id"]] = doc["price"]
    # resuming from there gets the rest, or 410 if it fell out of the history meanwhile
    again = Feed(svc, last_event_id=data["cursor"])
    assert again.status in (200, 410)
    again.close()


def durable(start_service, tmp_path, mode: str, name: str = "data"):
    return start_service(shards=2, workers=1, extra_args=["--data-dir", str(tmp_path / name)],
                         env={"PRODUCTD_DURABILITY": mode})


@pytest.mark.parametrize("mode", ["batch", "sync"])
def test_a_restart_keeps_the_history_and_a_shard_killed_9_never_silently_skips(start_service, tmp_path, mode):
    svc = durable(start_service, tmp_path, mode)
    pid = uid("crash")
    products = [f"{pid}-{i}" for i in range(20)]
    feed = Feed(svc, f"ids={','.join(products)}")
    post(svc, [{"product_id": p, "price": 1.0, "stock": 1} for p in products])
    first = feed.take(20)
    assert len(first) == 20
    cursor = first[-1]["id"]
    feed.close()
    # A clean restart: the history is in the files, the cursor resumes.
    assert svc.stop() == 0
    svc = durable(start_service, tmp_path, mode)
    post(svc, [{"product_id": p, "price": 2.0, "stock": 2} for p in products])
    resumed = Feed(svc, f"ids={','.join(products)}", last_event_id=cursor)
    assert resumed.status == 200
    second = resumed.take(20)
    assert sorted(changes_of(second)) == sorted((p, 2.0, 2) for p in products)
    cursor = second[-1]["id"]
    # Kill -9 one shard right after changes it may not have committed (batch), while subscribed.
    post(svc, [{"product_id": p, "price": 3.0, "stock": 3} for p in products])
    third = resumed.take(20)
    assert len(third) == 20
    victim = 0
    old_pid = svc.shard_pids()[victim]
    os.kill(old_pid, signal.SIGKILL)
    svc.wait_for(lambda: (lambda s: s["pid"] != old_pid and s["alive"] and s["ready"])(svc.shard_info()[victim]),
                 "the shard to be restarted", deadline=30)
    post(svc, [{"product_id": p, "price": 4.0, "stock": 4} for p in products])
    # The open stream either goes on (what it saw was committed: sync, or batch after a commit)
    # with every new change, or is cut off as history-lost: never a silent skip.
    rest = resumed.take(20, deadline=30)
    resumed.close()
    if rest and rest[-1]["event"] == "cut-off":
        assert rest[-1]["data"]["reason"] == "history-lost", rest[-1]
        resp = get_changes(svc, since=rest[-1]["id"])
        assert_problem(resp, 410)
    else:
        assert sorted(changes_of(rest)) == sorted((p, 4.0, 4) for p in products)
    # A cursor that saw the changes before the kill, reconnecting now: every change after it,
    # or 410; the 4.0 changes are never hidden behind a cursor that claims to have seen them.
    late = Feed(svc, f"ids={','.join(products)}", last_event_id=third[-1]["id"], timeout=5)
    if late.status == 200:
        got = late.take(20, deadline=10)
        assert sorted(changes_of(got)) == sorted((p, 4.0, 4) for p in products)
    else:
        assert late.status == 410
    late.close()


def test_a_batch_shard_killed_before_its_commit_refuses_cursors_that_saw_lost_changes(start_service, tmp_path):
    svc = start_service(shards=1, workers=1, extra_args=["--data-dir", str(tmp_path / "d"),
                                                         "--commit-interval", "30"],
                        env={"PRODUCTD_DURABILITY": "batch"})
    pid = uid("lost")
    post(svc, [{"product_id": pid + "-first", "price": 1.0, "stock": 1}])  # the first commit is at once
    time.sleep(0.5)
    feed = Feed(svc, f"ids={pid}")
    post(svc, [{"product_id": pid, "price": 1.0, "stock": 1}])
    [seen] = feed.take(1)  # applied, delivered, not committed (30 s interval)
    feed.close()
    old_pid = svc.shard_pids()[0]
    os.kill(old_pid, signal.SIGKILL)
    svc.wait_for(lambda: (lambda s: s["pid"] != old_pid and s["alive"] and s["ready"])(svc.shard_info()[0]),
                 "the shard to be restarted", deadline=30)
    post(svc, [{"product_id": pid, "price": 2.0, "stock": 2}])  # reuses nothing: the head jumped
    resp = get_changes(svc, since=seen["id"])
    body = assert_problem(resp, 410)
    assert "restarted" in body["detail"]


def test_durability_none_a_cursor_from_before_a_restart_is_410(start_service):
    svc = start_service(shards=1, workers=1)
    old = cursor_of(svc)
    assert svc.stop() == 0
    svc = start_service(shards=1, workers=1)
    post(svc, [{"product_id": f"{uid('n')}-{i}", "price": 1.0, "stock": 1} for i in range(50)])
    assert_problem(get_changes(svc, since=old), 410)


# ---------------------------------------------------------------- ChangeLog, pure


def rec(rev: int) -> bytes:
    return pack_fields(1.0, 1, None, 0, 0, rev, None)


def owned(rev: int, user: str) -> bytes:
    return pack_fields(1.0, 1, None, 0, 0, rev, (user, "name", None, ()))


def test_changelog_since_filters_limits_and_scans():
    log = ChangeLog(10)
    for seq in range(1, 8):
        log.append(seq, f"p{seq % 3}", rec(seq) if seq != 5 else owned(seq, "u"))
    assert log.oldest() == 0
    status, scanned, got = log.since(2, 2, None, None, 100)
    assert status == OK and [e[0] for e in got] == [3, 4] and scanned == 4
    status, scanned, got = log.since(0, 100, None, frozenset({"p1"}), 100)
    assert [e[0] for e in got] == [1, 4, 7] and scanned == 7
    status, scanned, got = log.since(0, 100, "u", None, 100)
    assert [e[0] for e in got] == [5]
    status, scanned, got = log.since(0, 100, None, frozenset({"zz"}), 3)
    assert got == [] and scanned == 3  # the scan bound: the cursor still moves
    assert log.since(7, 10, None, None, 100) == (OK, 7, [])
    assert log.since(8, 10, None, None, 100)[0] == LOST  # ahead of the head: another life


def test_changelog_expires_what_rolled_out():
    log = ChangeLog(5)
    for seq in range(1, 21):
        log.append(seq, "p", rec(seq))
    assert log.oldest() == 15
    assert log.since(14, 10, None, None, 100)[0] == EXPIRED
    assert [e[0] for e in log.since(15, 10, None, None, 100)[2]] == [16, 17, 18, 19, 20]


def test_changelog_void_refuses_cursors_inside_it_and_survives_a_reload():
    log = ChangeLog(100)
    for seq in range(1, 4):
        log.append(seq, "p", rec(seq))
    log.saved()
    # the shard died after applying 4..6 without committing; the next life loads 1..3
    again = ChangeLog(100)
    again.load(list(log.entries), 3)
    marker = again.void(1000)
    assert again.head == 1003 and marker[0] == 1003
    again.append(1004, "p", rec(1004))
    assert again.since(5, 10, None, None, 100)[0] == LOST
    assert [e[0] for e in again.since(3, 10, None, None, 100)[2]] == [1004]  # the marker is skipped
    third = ChangeLog(100)
    third.load(list(again.entries), 1004)
    third.void(1000)
    assert third.since(5, 10, None, None, 100)[0] == LOST  # the old void is remembered
    assert third.since(1500, 10, None, None, 100)[0] == LOST
    assert [e[0] for e in third.since(1004, 10, None, None, 100)[2]] == []


def test_changelog_remembers_whose_product_a_delete_removed():
    log = ChangeLog(10)
    log.append(1, "p", owned(1, "u"))
    log.append(2, "p", None)
    log.note_delete(2, owned(1, "u"))
    assert [e[0] for e in log.since(0, 10, "u", None, 100)[2]] == [1, 2]
    assert log.since(0, 10, "v", None, 100)[2] == []


def test_the_shard_parks_an_empty_changes_request_and_answers_it_after_the_next_batch():
    from productd.actors import protocol
    from productd.actors.shard import Shard
    from productd.actors.status import StatusBoard

    class Recording(Shard):
        def __init__(self) -> None:
            super().__init__(0, -1, StatusBoard(1))
            self.sent: list = []

        def reply(self, address, request_id, payload) -> None:
            self.sent.append((address, request_id, payload))

    shard = Recording()
    frames = protocol.FrameReader()
    body = frames.feed(protocol.frame(protocol.Changes.pack(b"\0a", 1, None, None, None, 10, 0.0)))
    shard.handle(body)
    head = shard.sent[-1][2][1]
    shard.handle(frames.feed(protocol.frame(protocol.Changes.pack(b"\0a", 2, head, None, ("x",), 10, 15.0))))
    assert len(shard.sent) == 1 and len(shard.parked) == 1  # parked: nothing yet
    events = [(0, protocol.pack_event("y", 1.0, 1, None)), (1, protocol.pack_event("x", 2.0, 2, None))]
    [(_, _, frame)] = protocol.events_frames(events, None, iter(range(5, 9)), 0)
    shard.handle(frames.feed(frame))
    shard._feed_turn()
    [(address, request_id, answer)] = shard.sent[1:]
    assert (address, request_id) == (b"\0a", 2) and not shard.parked
    status, new_head, _oldest, scanned_to, items = answer
    assert status == OK and new_head == head + 2 and scanned_to == head + 2
    assert [(seq, product_id) for seq, product_id, _ in items] == [(head + 2, "x")]


def test_the_history_on_disk_survives_several_restarts(start_service, tmp_path):
    """Each start jumps the head (the void range); the rows before it stay within --change-history."""
    svc = durable(start_service, tmp_path, "batch")
    old = cursor_of(svc)
    for _ in range(2):
        assert svc.stop() == 0
        svc = durable(start_service, tmp_path, "batch")
    assert get_changes(svc, since=old).status_code == 200
    assert svc.stop() == 0


def test_a_stop_ends_open_streams_with_a_cut_off(start_service):
    svc = start_service(shards=2, workers=1)
    feed = Feed(svc)
    started = time.monotonic()
    assert svc.stop() == 0
    assert time.monotonic() - started < 15  # the stream does not hold the stop for --graceful-timeout
    events = []
    while (event := feed.next()) is not None:
        events.append(event)
    assert events and events[-1]["event"] == "cut-off" and events[-1]["data"]["reason"] == "stopping"
    feed.close()
