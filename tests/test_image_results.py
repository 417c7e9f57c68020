"""The shard side of the image pipeline without processes: per-URL results in the record and
the shard file, the shard's enqueue and load-time scan against a real job file, the
ImageResult handler, and a worker delivering results into a real inbox pipe."""

from __future__ import annotations

import os
import sqlite3

import msgpack
import pytest
from frames import RecordingShard

from productd.actors import protocol, status
from productd.actors.inbox import Inbox
from productd.http.render import product_json
from productd.images.jobs import DEAD, JobQueue, Stored
from productd.images.results import ResultSender
from productd.images.settings import ImageSettings
from productd.images.worker import Worker
from productd.store import catalogue, record
from productd.store.sqlite import ShardFile

A, B, C = "https://img.example/a.jpg", "https://img.example/b.jpg", "https://img.example/c.jpg"
KEY = "d" * 64 + ".webp"
DONE_RESULT = ("done", KEY, "webp", 1024, 768, 29344)


def _product(images=(A, B), results=None, rev=1) -> bytes:
    return record.pack_fields(9.5, 3, None, 1_000, 1_000, rev, ("u", "n", None, images, results))


def _stored(key: str = KEY) -> Stored:
    return Stored(key, "webp", 1024, 768, 29344, "e" * 64, "JPEG", 2000, 1500, 0.0)


def test_a_record_from_before_image_results_loads_with_every_image_pending():
    old = record.pack_fields(1.0, 1, None, 5, 5, 7) + msgpack.packb(("u", "n", "d", (A, B)), use_bin_type=True)
    product = record.unpack(old)
    assert product.images == (A, B) and product.image_results is None
    assert record.pending_images(old) == [A, B]
    assert product_json("p", old)["images"] == [{"url": A, "state": "pending"}, {"url": B, "state": "pending"}]
    # The first result turns it into the five-item form; the rest of the record is untouched.
    new = record.with_image_result(old, A, DONE_RESULT, 9, 8)
    assert record.unpack(new)[:10] == record.unpack(old)[:3] + (9, 5, 8, "u", "n", "d", (A, B))
    assert record.unpack(new).image_results == {A: DONE_RESULT}


def test_results_show_per_image_and_apply_once_and_only_for_shown_urls():
    packed = _product()
    assert record.with_image_result(packed, C, DONE_RESULT, 2, 2) is None  # not shown: dropped
    done = record.with_image_result(packed, A, DONE_RESULT, 2, 2)
    assert record.with_image_result(done, A, DONE_RESULT, 3, 3) is None  # twice: nothing changes
    failed = record.with_image_result(done, B, ("failed", "http-4xx"), 3, 3)
    assert record.revision(failed) == 3 and record.unpack(failed).updated_at_ns == 3
    assert record.pending_images(failed) == []
    assert product_json("p", failed)["images"] == [
        {"url": A, "state": "done", "rendition": {"url": f"/images/{KEY}", "format": "webp", "width": 1024,
                                                 "height": 768, "bytes": 29344}},
        {"url": B, "state": "failed", "reason": "http-4xx"},
    ]
    assert record.with_image_result(record.pack_fields(1.0, 1, None, 1, 1, 1), A, DONE_RESULT, 2, 2) is None  # bare


def test_a_replaced_image_list_keeps_only_the_results_of_urls_it_still_shows():
    packed = _product(results={A: DONE_RESULT, B: ("failed", "timeout")})
    outcome, new = catalogue.apply(packed, catalogue.PATCH, {"images": [B, C]}, None, None, 5, 5)
    assert outcome == catalogue.OK
    assert record.unpack(new).image_results == {B: ("failed", "timeout")}
    assert record.pending_images(new) == [C]
    outcome, new = catalogue.apply(packed, catalogue.PUT, {"user_id": "u", "name": "n"}, None, None, 6, 6)
    assert record.unpack(new).images == () and record.unpack(new).image_results is None
    outcome, new = catalogue.apply(packed, catalogue.PATCH, {"price": 1.0}, None, None, 7, 7)
    assert record.unpack(new).image_results == {A: DONE_RESULT, B: ("failed", "timeout")}


@pytest.mark.parametrize("schema", [2, 3])
def test_the_shard_file_keeps_results_and_a_file_from_before_them_still_loads(tmp_path, schema):
    path = str(tmp_path / "shard-0.sqlite3")
    db = sqlite3.connect(path)
    owner = ", owner TEXT" if schema == 3 else ""
    db.executescript(f"""
        CREATE TABLE products (id TEXT PRIMARY KEY, price REAL, stock INTEGER, version INTEGER,
            updated_at_ns INTEGER NOT NULL, created_at_ns INTEGER, revision INTEGER NOT NULL DEFAULT 0,
            user_id TEXT, name TEXT, description TEXT, images TEXT) WITHOUT ROWID;
        CREATE TABLE changes (seq INTEGER PRIMARY KEY, product_id TEXT NOT NULL, record BLOB{owner});
        PRAGMA user_version = {schema};
    """)
    db.execute("INSERT INTO products VALUES ('old', 1.0, 1, NULL, 5, 5, 3, 'u', 'n', NULL, ?)", (f'["{A}"]',))
    db.commit()
    db.close()
    f = ShardFile(path, sync=False)
    [(pid, old)] = list(f.rows())
    assert pid == "old" and record.pending_images(old) == [A]
    done = record.with_image_result(_product(), A, DONE_RESULT, 4, 4)
    f.save([("new", done)], [], 0)
    f.close()
    rows = dict(ShardFile(path, sync=False).rows())
    assert rows["new"] == done and record.unpack(rows["new"]).image_results == {A: DONE_RESULT}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 4


def _write(op, pid, fields) -> bytes:
    return protocol.frame(protocol.Write.pack(b"\0x", 1, op, pid, fields, None, None))


def _result(pid, url, result) -> bytes:
    return protocol.frame(protocol.ImageResult.pack(pid, url, result))


def _shard(tmp_path, **kw) -> RecordingShard:
    shard = RecordingShard(images=ImageSettings(data_dir=str(tmp_path)), **kw)
    shard._open_jobs()
    return shard


def test_the_shard_enqueues_new_urls_and_drops_results_for_a_replaced_list(tmp_path):
    shard = _shard(tmp_path)
    queue = JobQueue(ImageSettings(data_dir=str(tmp_path)).jobs_path)
    shard.handle(protocol.FrameReader().feed(_write(catalogue.CREATE, "p1", {"user_id": "u", "name": "n",
                                                                             "images": [A, B]})))
    assert {j.url for j in queue.list()} == {A, B}
    assert queue.products_of(queue.by_url(A).id) == ["p1"]
    # The list is replaced while the jobs run: only the new URL is queued...
    shard.handle(protocol.FrameReader().feed(_write(catalogue.PATCH, "p1", {"images": [B, C]})))
    assert {j.url for j in queue.list()} == {A, B, C} and queue.products_of(queue.by_url(C).id) == ["p1"]
    head = shard.changes.head
    # ...and the old list's result is dropped, counted, and not a change.
    shard.handle(protocol.FrameReader().feed(_result("p1", A, DONE_RESULT) + _result("gone", A, DONE_RESULT)))
    assert shard.board.get(0, status.IMAGE_RESULTS_DROPPED) == 2 and shard.changes.head == head
    assert record.unpack(shard.store.get_packed("p1")).image_results is None
    # A result for a shown URL is a change, in the feed; applying it again changes nothing.
    shard.handle(protocol.FrameReader().feed(_result("p1", B, DONE_RESULT)))
    assert shard.changes.head == head + 1 and shard.changes.entries[-1][1] == "p1"
    assert record.revision(shard.store.get_packed("p1")) == head + 1
    shard.handle(protocol.FrameReader().feed(_result("p1", B, DONE_RESULT)))
    assert shard.changes.head == head + 1 and shard.board.get(0, status.IMAGE_RESULTS_DROPPED) == 2


def test_a_url_whose_job_ended_is_applied_at_once(tmp_path):
    queue = JobQueue(ImageSettings(data_dir=str(tmp_path)).jobs_path)
    queue.enqueue(A)
    job = queue.take("w", 60)
    assert queue.complete(job, _stored(), 1000)
    queue.enqueue(B)
    assert queue.fail(queue.take("w", 60), "http-4xx", "404", transient=False) == DEAD
    shard = _shard(tmp_path)
    shard.handle(protocol.FrameReader().feed(_write(catalogue.CREATE, "p2", {"user_id": "u", "name": "n",
                                                                             "images": [A, B, C]})))
    doc = product_json("p2", shard.store.get_packed("p2"))
    assert [i["state"] for i in doc["images"]] == ["done", "failed", "pending"]
    assert doc["images"][0]["rendition"]["url"] == f"/images/{KEY}" and doc["images"][1]["reason"] == "http-4xx"
    # Only the pending one waits in job_products: the ended ones are not delivered again.
    assert queue.products_of(queue.by_url(A).id) == [] and queue.products_of(queue.by_url(C).id) == ["p2"]


def test_a_retried_dead_job_reaches_the_products_that_were_shown_its_failure(tmp_path):
    queue = JobQueue(ImageSettings(data_dir=str(tmp_path)).jobs_path)
    queue.enqueue(B, "p1")
    job = queue.take("w", 60)
    assert queue.fail(job, "http-5xx", "503", transient=False) == DEAD
    assert [(j.id, p) for j, p in queue.undelivered()] == [(job.id, "p1")]
    queue.delivered(job.id, "p1")  # p1 shows the failure
    assert queue.enqueue_many([(B, "p2")]) == [("p2", B, ("failed", "http-5xx"))]  # p2 is shown it at once
    assert queue.undelivered() == [] and queue.products_of(job.id) == []
    assert queue.retry(job.id).state == "queued"
    assert queue.products_of(job.id) == ["p1", "p2"]  # both wait for the retry
    assert queue.complete(queue.take("w", 60), _stored(), 1000)
    assert sorted(p for _, p in queue.undelivered()) == ["p1", "p2"]
    queue.delivered(job.id, "p1")
    queue.delivered(job.id, "p2")
    assert queue.retry(job.id) is None and queue.products_of(job.id) == []  # done: nothing to re-drive


def test_a_durable_shard_enqueues_after_the_commit_and_its_load_queues_what_is_pending(tmp_path):
    path = str(tmp_path / "shard-0.sqlite3")
    queue = JobQueue(ImageSettings(data_dir=str(tmp_path)).jobs_path)
    shard = _shard(tmp_path, path=path, durability="batch", commit_interval=60)
    shard.handle(protocol.FrameReader().feed(_write(catalogue.CREATE, "p3", {"user_id": "u", "name": "n",
                                                                             "images": [A]})))
    assert queue.list() == []  # not committed yet: no job may name it
    assert shard.commit()
    assert [j.url for j in queue.list()] == [A]
    # A crash between a commit and its enqueue: the product is in the file, no job for C.
    f = ShardFile(path, sync=False)
    f.save([("p4", _product(images=(C,)))], [], 0)
    f.close()
    shard.file.close()
    again = _shard(tmp_path, path=path, durability="batch")
    again.load()
    again._resume_feed()
    again._scan_pending_images()
    assert {j.url for j in queue.list()} == {A, C}
    assert queue.products_of(queue.by_url(C).id) == ["p4"]


def test_a_worker_delivers_results_into_the_inbox_and_re_sends_what_it_could_not(tmp_path):
    settings = ImageSettings(data_dir=str(tmp_path), nice=0)
    inbox = Inbox(4096)
    sender = ResultSender([inbox.write_fd], [inbox.bell_write_fd], 1, deadline=0.05)
    worker = Worker(settings, "w", sender=sender)
    queue = worker.queue
    queue.enqueue(A, "p1")
    queue.enqueue(A, "p2")
    job = queue.take("w", 60)
    assert queue.complete(job, _stored(), 1000)
    # Killed before sending: the rows are left, and the re-send delivers them.
    assert worker.resend() == 2
    os.set_blocking(inbox.read_fd, False)
    reader = protocol.FrameReader()
    bodies = reader.feed(os.read(inbox.read_fd, 65536))
    heads = [msgpack.unpackb(body, raw=False, use_list=False) for body in bodies]
    assert [protocol.unpack(h) for h in heads] == [protocol.ImageResult("p1", A, DONE_RESULT),
                                                   protocol.ImageResult("p2", A, DONE_RESULT)]
    assert queue.products_of(job.id) == [] and queue.undelivered() == []
    assert os.read(inbox.bell_read_fd, 10)  # rung
    # A full inbox: send answers False and the row stays for the next re-send.
    while True:
        try:
            os.write(inbox.write_fd, b"x" * 4096)
        except BlockingIOError:
            break
    queue.enqueue(B, "p3")
    job = queue.take("w", 60)
    assert queue.fail(job, "not-an-image", "text", transient=False) == DEAD
    assert worker.deliver(job.id) == 0
    assert [(j.url, p) for j, p in queue.undelivered()] == [(B, "p3")]
    try:  # the shard reads its inbox: room again, and the re-send delivers the dead job's result
        while os.read(inbox.read_fd, 65536):
            pass
    except BlockingIOError:
        pass
    assert worker.resend() == 1 and queue.undelivered() == []
    [body] = protocol.FrameReader().feed(os.read(inbox.read_fd, 65536))
    assert protocol.unpack(msgpack.unpackb(body, raw=False, use_list=False)) == protocol.ImageResult(
        "p3", B, ("failed", "not-an-image"))
