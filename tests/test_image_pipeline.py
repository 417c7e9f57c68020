"""The image pipeline through the live service: a real `productd serve`, HTTP on 127.0.0.1 and
a local image server this test starts (tests/test_images.py's ImageServer).

The first test runs the service without a pool (`--image-workers 0`) and a worker beside it as
`python -m productd.images.worker` (which has no inbox to send to): it ends the jobs, and the
service's restart then shows them, through the shards' load-time scan. The others use the
supervisor's pool."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests
from service import TIMEOUT, uid
from test_durability import crash
from test_images import ImageServer, _settings, _worker_process

from productd.images.jobs import DEAD, DONE, JobQueue

DEADLINE = 60.0


@pytest.fixture
def images():
    server = ImageServer()
    yield server
    server.close()


def _create(svc, pid: str, images: list[str]) -> dict:
    r = requests.post(f"{svc.url}/products", json={"product_id": pid, "user_id": "u1", "name": "Mug",
                                                   "images": images}, timeout=TIMEOUT)
    assert r.status_code == 201, r.text
    return r.json()


def _doc(svc, pid: str) -> dict:
    r = requests.get(f"{svc.url}/products/{pid}", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def _states(doc: dict) -> dict[str, str]:
    return {image["url"]: image["state"] for image in doc["images"]}


def _wait(what: str, check, timeout: float = DEADLINE):
    end = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def _object_path(data_dir: Path, rendition_url: str) -> Path:
    key = rendition_url.removeprefix("/images/")
    return data_dir / "images" / key[:2] / key[2:4] / key


def test_jobs_ended_while_undelivered_show_after_a_restart_and_a_replaced_list_never_shows(
        start_service, images, tmp_path):
    data = tmp_path / "data"
    durable = {"shards": 2, "workers": 1, "extra_args": ["--data-dir", str(data), "--image-workers", "0"],
               "env": {"PRODUCTD_DURABILITY": "batch"}}
    svc = start_service(**durable)
    photo, missing, old = images.url("/img/photo.jpg"), images.url("/status/404"), images.url("/img/photo-as-text")
    kept, portrait = images.url("/img/cutout.png"), images.url("/img/portrait.jpg")
    p1, p2 = uid("img"), uid("img")
    doc = _create(svc, p1, [photo, missing])
    assert doc["images"] == [{"url": photo, "state": "pending"}, {"url": missing, "state": "pending"}]
    _create(svc, p2, [old, kept])
    r = requests.patch(f"{svc.url}/products/{p2}", json={"images": [kept, portrait]}, timeout=TIMEOUT)
    assert r.status_code == 200 and _states(r.json()) == {kept: "pending", portrait: "pending"}, r.text
    queue = JobQueue(data / "images" / "jobs.sqlite3")
    _wait("the jobs queued after their commit", lambda: len(queue.list()) == 5)
    assert queue.products_of(queue.by_url(photo).id) == [p1]
    # A worker beside the service ends every job; it has no inbox, so nothing reaches the products.
    worker = _worker_process(_settings(data), "beside")
    try:
        _wait("every job ended", lambda: all(j.state in (DONE, DEAD) for j in queue.list()))
    finally:
        worker.terminate()
        worker.wait(10)
    assert {j.url: j.state for j in queue.list()} == {photo: DONE, missing: DEAD, old: DONE, kept: DONE,
                                                      portrait: DONE}
    assert set(_states(_doc(svc, p1)).values()) == {"pending"}
    svc.stop()
    # The restart's scan queues what shows pending; the ended jobs apply at once.
    svc = start_service(**durable)
    doc = _wait("the results shown", lambda: (d := _doc(svc, p1)) and "pending" not in _states(d).values() and d)
    done, failed = doc["images"]
    assert done["url"] == photo and done["state"] == "done" and failed == {"url": missing, "state": "failed",
                                                                              "reason": "http-404"}
    rendition = done["rendition"]
    assert rendition["format"] == "webp" and rendition["url"].startswith("/images/")
    assert rendition["url"].endswith(".webp")
    assert max(rendition["width"], rendition["height"]) <= 1024
    assert _object_path(data, rendition["url"]).stat().st_size == rendition["bytes"]
    doc2 = _wait("p2's results", lambda: (d := _doc(svc, p2)) and "pending" not in _states(d).values() and d)
    assert [i["url"] for i in doc2["images"]] == [kept, portrait]  # the old list's URL never shows
    assert _states(doc2) == {kept: "done", portrait: "done"}
    # Every product document shows the same per-image state: multi-get and listing (the feed's
    # documents are the same product_json: tests/test_image_results.py checks a result is a change).
    many = requests.get(f"{svc.url}/products?ids={p1},{p2}", timeout=TIMEOUT)  # literal comma, as the spec
    assert many.status_code == 200, many.text
    assert {p["product_id"]: p["images"] for p in many.json()["products"]} == {p1: doc["images"], p2: doc2["images"]}
    listed = requests.get(f"{svc.url}/products", params={"user_id": "u1"}, timeout=TIMEOUT)
    assert listed.status_code == 200, listed.text
    assert {p["product_id"]: p["images"] for p in listed.json()["products"]} == {p1: doc["images"],
                                                                                  p2: doc2["images"]}
    # What the scan applied waits no more; the replaced URL's row is left for a pool worker, whose
    # message the shard drops.
    assert [(job.url, product) for job, product in queue.undelivered()] == [(old, p2)]


def _pool(start_service, tmp_path, **extra):
    return start_service(shards=2, workers=1, extra_args=[
        "--data-dir", str(tmp_path / "data"), "--image-workers", "1", "--image-allow-private",
        "--image-backoff-base", "0.1", "--image-max-attempts", "4", *extra.pop("args", ())],
        env={"PRODUCTD_DURABILITY": "batch"}, **extra)


def test_with_the_pool_every_image_ends_done_or_failed_and_transient_failures_are_retried(
        start_service, images, tmp_path):
    svc = _pool(start_service, tmp_path)
    photo, missing, flaky = images.url("/img/photo.jpg"), images.url("/status/404"), images.url("/flaky/2/photo.jpg")
    text = images.url("/img/text")
    pid = uid("pool")
    _create(svc, pid, [photo, missing, flaky, text])
    doc = _wait("every image ended", lambda: (d := _doc(svc, pid)) and "pending" not in _states(d).values() and d)
    assert _states(doc) == {photo: "done", missing: "failed", flaky: "done", text: "failed"}
    assert images.hits["/flaky/2/photo.jpg"] == 3  # two 500s, then the image


def test_with_the_pool_a_list_replaced_while_its_job_runs_never_shows_the_old_result(
        start_service, images, tmp_path):
    svc = _pool(start_service, tmp_path)
    slow, photo = images.url("/hang/photo.jpg"), images.url("/img/portrait.jpg")
    pid = uid("repl")
    _create(svc, pid, [slow])
    assert images.hang_started.wait(DEADLINE)  # the worker is mid-download
    r = requests.put(f"{svc.url}/products/{pid}", json={"user_id": "u1", "name": "Mug", "images": [photo]},
                     timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    images.hang_release.set()
    end = time.monotonic() + 3.0
    doc = _wait("the new image done", lambda: (d := _doc(svc, pid)) and _states(d) == {photo: "done"} and d)
    while time.monotonic() < end:  # the old job ends meanwhile: its result is dropped, never shown
        assert [i["url"] for i in _doc(svc, pid)["images"]] == [photo]
        time.sleep(0.1)
    assert _doc(svc, pid)["images"] == doc["images"]
    # The old job's result reached the shard and was dropped, which /metrics counts.
    _wait("the dropped result counted", lambda: svc.metric_sum("productd_image_results_dropped_total") >= 1)


def test_kill_9_of_a_worker_mid_download_and_of_the_whole_service_loses_no_job(start_service, images, tmp_path):
    """With sync durability a 201 means committed: whatever is killed afterwards, every image of
    the product ends done. A worker killed mid-download leaves its job to be taken again once
    its lease (3 s here) runs out; the whole service killed right after a create leaves jobs the
    restart's load-time scan queues (or finds queued)."""
    data = tmp_path / "data"

    def start():
        return start_service(shards=2, workers=1, env={"PRODUCTD_DURABILITY": "sync"}, extra_args=[
            "--data-dir", str(data), "--image-workers", "1", "--image-allow-private",
            "--image-total-timeout", "2", "--image-lease", "3"])

    svc = start()
    hang, photo = images.url("/hang/photo.jpg"), images.url("/img/photo.jpg")
    first = uid("k9")
    _create(svc, first, [hang, photo])
    assert images.hang_started.wait(DEADLINE)  # the worker is mid-download
    [worker] = svc.readyz().json()["image_workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    images.hang_release.set()  # the next attempt gets the whole image
    doc = _wait("both images done after the worker's kill",
                lambda: (d := _doc(svc, first)) and set(_states(d).values()) == {"done"} and d)
    assert images.hits["/hang/photo.jpg"] >= 2  # taken again after the lease
    assert svc.readyz().json()["image_workers"][0]["pid"] != worker["pid"]

    second = uid("k9")
    more = [images.url("/img/portrait.jpg"), images.url("/img/cutout.png"), images.url("/flaky/1/photo.jpg")]
    _create(svc, second, more)
    crash(svc)  # every process of the service, at once, right after the 201
    svc = start()
    again = _wait("every image of the product created before the crash done",
                  lambda: (d := _doc(svc, second)) and set(_states(d).values()) == {"done"} and d)
    assert [i["url"] for i in again["images"]] == more
    assert _doc(svc, first)["images"] == doc["images"]
