"""The image pipeline's edge (issue 13), against the live service: `GET`/`HEAD /images/{key}`
(ETag, caching, Range, 304, hostile keys), `/admin/image-jobs` (list, retry, auth), the image
worker pool the supervisor runs (visible, restarted after kill -9, stopped by SIGTERM, a
temporary directory with --durability none), and its metrics.

Objects are seeded by putting them into a DirectoryStore under the service's data dir, jobs
with a JobQueue on its job file (with --image-workers 0 nothing takes them meanwhile); the
end-to-end test serves generated images from a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import os
import re
import signal
import threading
from pathlib import Path

import pytest
import requests
from service import TIMEOUT, assert_problem, children, parent, raw_request

from productd.images.jobs import JobQueue, path_in
from productd.images.objects import DirectoryStore

PIL = pytest.importorskip("PIL.Image")


def start(start_service, tmp_path, *args, workers=0, env=None):
    data = tmp_path / "data"
    svc = start_service(shards=2, workers=1, extra_args=["--image-workers", str(workers), *args],
                        env={"PRODUCTD_DURABILITY": "batch", "PRODUCTD_DATA_DIR": str(data), **(env or {})})
    return svc, data


def metrics(svc) -> dict[tuple[str, str], float]:
    """/metrics as {(series, its labels as written inside the braces): value}."""
    r = requests.get(svc.url + "/metrics", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    out = {}
    for line in r.text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)$", line)
        if m and not line.startswith("#"):
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def image_workers(svc) -> list[dict]:
    return svc.readyz().json()["image_workers"]


# ---- GET /images/{key} -------------------------------------------------------------------


def test_a_stored_image_is_served_with_a_strong_etag_a_year_of_caching_and_head(start_service, tmp_path):
    svc, data = start(start_service, tmp_path)
    body = os.urandom(5000)
    key = DirectoryStore(data / "images").put(body, "webp")
    digest = key.split(".")[0]
    r = requests.get(f"{svc.url}/images/{key}", timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == body
    assert r.headers["Content-Type"] == "image/webp"
    assert r.headers["ETag"] == f'"{digest}"'  # strong: no W/
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert r.headers["Accept-Ranges"] == "bytes" and r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Length"] == "5000"

    status, headers, got = raw_request(svc.port, "HEAD", f"/images/{key}")
    assert status == 200 and got == b""
    assert headers["content-length"] == "5000" and headers["etag"] == f'"{digest}"'
    assert headers["content-type"] == "image/webp"

    for tag in (f'"{digest}"', f'W/"{digest}"', f'"other", "{digest}"', "*"):
        r = requests.get(f"{svc.url}/images/{key}", headers={"If-None-Match": tag}, timeout=TIMEOUT)
        assert r.status_code == 304 and r.content == b"", tag
        assert r.headers["ETag"] == f'"{digest}"' and "immutable" in r.headers["Cache-Control"]
    r = requests.get(f"{svc.url}/images/{key}", headers={"If-None-Match": '"0000"'}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == body


def test_range_requests(start_service, tmp_path):
    svc, data = start(start_service, tmp_path)
    body = bytes(range(256)) * 40  # 10240 bytes
    key = DirectoryStore(data / "images").put(body, "webp")
    url = f"{svc.url}/images/{key}"

    def get(range_header, **headers):
        return requests.get(url, headers={"Range": range_header, **headers}, timeout=TIMEOUT)

    for spec, first, last in (("bytes=0-9", 0, 9), ("bytes=10-", 10, 10239), ("bytes=-5", 10235, 10239),
                              ("bytes=10000-99999", 10000, 10239), ("bytes=-99999", 0, 10239),
                              ("BYTES = 5-5", 5, 5)):
        r = get(spec)
        assert r.status_code == 206, (spec, r.status_code, r.text[:200])
        assert r.headers["Content-Range"] == f"bytes {first}-{last}/10240", spec
        assert r.content == body[first:last + 1], spec
        assert r.headers["ETag"] and r.headers["Content-Type"] == "image/webp"
    status, headers, got = raw_request(svc.port, "HEAD", f"/images/{key}", headers={"Range": "bytes=0-99"})
    assert (status, headers["content-length"], got) == (206, "100", b"")

    # Several ranges: the whole image (no multipart answers); an unknown unit: ignored.
    for spec in ("bytes=0-1,5-6", "bytes=0-1, 99999-", "items=0-1"):
        r = get(spec)
        assert r.status_code == 200 and r.content == body, spec
    # If-Range naming another object: the whole (the client's copy is not this one).
    r = get("bytes=0-9", **{"If-Range": '"abc"'})
    assert r.status_code == 200 and r.content == body
    r = get("bytes=0-9", **{"If-Range": r.headers["ETag"]})
    assert r.status_code == 206 and r.content == body[:10]

    for spec, words in (("bytes=10240-", "asks for nothing"), ("bytes=-0", "asks for nothing"),
                        ("bytes=99999-, 20000-", "asks for nothing"), ("bytes=abc", "is not first-last"),
                        ("bytes=9-3", "ends before it starts"), ("bytes=", "is not first-last"),
                        ("bytes=1-2-3", "is not first-last")):
        r = get(spec)
        problem = assert_problem(r, 416)
        assert words in problem["detail"], (spec, problem)
        assert r.headers["Content-Range"] == "bytes */10240", spec
        assert "immutable" not in r.headers.get("Cache-Control", ""), spec


@pytest.mark.parametrize("target", [
    "/images/abc",
    "/images/" + "0" * 64 + ".webp",  # a well-formed key of nothing stored
    "/images/" + "A" * 64 + ".webp",
    "/images/" + "a" * 63 + ".webp",
    "/images/" + "a" * 64,
    "/images/" + "a" * 64 + ".we/bp",
    "/images/..%2f..%2fjobs.sqlite3",
    "/images/%2e%2e",
    "/images/../images/x",
    "/images/" + "a" * 64 + ".webp%00",
    "/images/" + "a" * 64 + ".WEBP",
    "/images/jobs.sqlite3",
    "/images/",
])
def test_anything_but_a_stored_key_is_a_404_problem(start_service, tmp_path, target):
    svc, data = start(start_service, tmp_path)
    DirectoryStore(data / "images").put(b"x" * 10, "webp")  # something is stored
    status, headers, body = raw_request(svc.port, "GET", target)
    assert status == 404, (target, status, body[:200])
    assert_problem((status, headers, body), 404)
    assert b"SQLite" not in body


# ---- /admin/image-jobs -------------------------------------------------------------------


def _seed_jobs(data: Path) -> tuple[JobQueue, list[int], int]:
    queue = JobQueue(path_in(data), max_attempts=3)
    queue.enqueue("http://images.example/gone.jpg", "p-gone")
    job = queue.take("test", 60)  # the only job: the one taken
    assert queue.fail(job, "http-4xx", "404 Not Found", transient=False) == "dead"
    queued = [queue.enqueue(f"http://images.example/{i}.jpg", f"p{i}").id for i in range(5)]
    return queue, queued, job.id


def test_admin_lists_jobs_and_retries_a_dead_one(start_service, tmp_path):
    svc, data = start(start_service, tmp_path)
    queue, queued, dead_id = _seed_jobs(data)
    r = requests.get(f"{svc.url}/admin/image-jobs", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    jobs = r.json()["jobs"]
    assert [j["id"] for j in jobs] == sorted([*queued, dead_id]) and r.json()["next_after"] is None
    dead = next(j for j in jobs if j["id"] == dead_id)
    assert dead["state"] == "dead" and dead["attempts"] == 1 and dead["last_reason"] == "http-4xx"
    assert dead["last_error"] == "404 Not Found" and dead["product_ids"] == ["p-gone"]
    assert dead["url"] == "http://images.example/gone.jpg" and dead["next_attempt_at"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", dead["created_at"])
    assert "lease_token" not in dead

    r = requests.get(f"{svc.url}/admin/image-jobs?state=dead", timeout=TIMEOUT)
    assert [j["id"] for j in r.json()["jobs"]] == [dead_id]
    pages, after = [], 0
    while True:
        r = requests.get(f"{svc.url}/admin/image-jobs?state=queued&limit=2&after={after}", timeout=TIMEOUT)
        page = r.json()
        pages.append([j["id"] for j in page["jobs"]])
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert sum(pages, []) == [i for i in queued] and all(len(p) <= 2 for p in pages)

    for query, names in (("state=alive", {"state"}), ("limit=0", {"limit"}), ("limit=1001", {"limit"}),
                         ("after=-1", {"after"}), ("after=x&limit=y", {"after", "limit"}),
                         ("state=dead&state=done", {"state"}), ("sort=id", {"sort"}),
                         ("after=99999999999999999999", {"after"})):
        problem = assert_problem(requests.get(f"{svc.url}/admin/image-jobs?{query}", timeout=TIMEOUT), 400)
        assert {p["name"] for p in problem["parameters"]} == names, (query, problem)

    r = requests.post(f"{svc.url}/admin/image-jobs/{dead_id}/retry", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert (r.json()["id"], r.json()["state"], r.json()["attempts"]) == (dead_id, "queued", 0)
    assert queue.get(dead_id).state == "queued"  # in the job file, for the workers
    problem = assert_problem(requests.post(f"{svc.url}/admin/image-jobs/{dead_id}/retry", timeout=TIMEOUT), 409)
    assert "is queued; only a dead job can be retried" in problem["detail"]
    for job_id in ("999999", "0", "abc", "-1", "1e3", "99999999999999999999"):
        r = requests.post(f"{svc.url}/admin/image-jobs/{job_id}/retry", timeout=TIMEOUT)
        assert "image job" in assert_problem(r, 404)["detail"], job_id
    assert_problem(requests.get(f"{svc.url}/admin/image-jobs/{dead_id}/retry", timeout=TIMEOUT), 405)
    assert_problem(requests.post(f"{svc.url}/admin/image-jobs", timeout=TIMEOUT), 405)
    queue.close()


def test_the_admin_endpoints_need_the_token_when_auth_is_on(start_service, tmp_path):
    token = "tok-" + os.urandom(16).hex()
    (tmp_path / "token").write_text(token)
    svc, data = start(start_service, tmp_path, "--auth-token-file", str(tmp_path / "token"))
    queue, _, dead_id = _seed_jobs(data)
    key = DirectoryStore(data / "images").put(b"img" * 10, "webp")
    auth = {"Authorization": f"Bearer {token}"}
    for method, path in (("GET", "/admin/image-jobs"), ("POST", f"/admin/image-jobs/{dead_id}/retry")):
        r = requests.request(method, svc.url + path, timeout=TIMEOUT)  # without --auth-reads too
        assert_problem(r, 401)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = requests.request(method, svc.url + path, headers={"Authorization": "Bearer wrong"}, timeout=TIMEOUT)
        assert_problem(r, 401)
    assert queue.get(dead_id).state == "dead"  # the refused retry did nothing
    assert requests.get(svc.url + "/admin/image-jobs", headers=auth, timeout=TIMEOUT).status_code == 200
    r = requests.post(f"{svc.url}/admin/image-jobs/{dead_id}/retry", headers=auth, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["state"] == "queued"
    # The images themselves are read like products: open without --auth-reads.
    assert requests.get(f"{svc.url}/images/{key}", timeout=TIMEOUT).status_code == 200
    queue.close()


def test_with_auth_reads_the_images_need_the_token_too(start_service, tmp_path):
    token = "tok-" + os.urandom(16).hex()
    (tmp_path / "token").write_text(token)
    svc, data = start(start_service, tmp_path, "--auth-token-file", str(tmp_path / "token"), "--auth-reads")
    key = DirectoryStore(data / "images").put(b"img" * 10, "webp")
    assert_problem(requests.get(f"{svc.url}/images/{key}", timeout=TIMEOUT), 401)
    r = requests.get(f"{svc.url}/images/{key}", headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == b"img" * 10


# ---- the pool ----------------------------------------------------------------------------


def test_the_pool_is_run_restarted_and_stopped_by_the_supervisor(start_service, tmp_path):
    svc = start_service(shards=2, workers=1, extra_args=["--image-workers", "2"])  # --durability none
    workers = svc.wait_for(lambda: len(image_workers(svc)) == 2 and image_workers(svc), "2 image workers")
    pids = [w["pid"] for w in workers]
    assert [w["name"] for w in workers] == ["image-worker-0", "image-worker-1"]
    assert all(w["state"] == "ready" and w["restarts"] == 0 for w in workers), workers
    # Children of the supervisor, not of gunicorn's arbiter (which reaps every child it has).
    assert all(parent(pid) == svc.pid for pid in pids) and set(pids) <= set(children(svc.pid))
    assert not set(pids) & set(svc.worker_pids())
    # With --durability none, the pipeline runs in a temporary directory of its own.
    match = re.search(r"image pipeline in (\S+)/images: 2 image workers", svc.log_text())
    assert match, svc.log_tail()
    temp_dir = Path(match.group(1))
    assert temp_dir.name.startswith("productd-images-") and (temp_dir / "images" / "jobs.sqlite3").exists()
    m = metrics(svc)
    assert m[("productd_image_workers", "")] == 2
    assert m[("productd_image_worker_up", 'worker="0"')] == 1 and m[("productd_image_worker_up", 'worker="1"')] == 1

    os.kill(pids[0], signal.SIGKILL)
    restarted = svc.wait_for(
        lambda: (w := image_workers(svc))[0]["pid"] not in (0, pids[0]) and w[0]["state"] == "ready" and w,
        "image worker 0 restarted")
    assert restarted[0]["restarts"] == 1 and restarted[1] == workers[1]
    assert parent(restarted[0]["pid"]) == svc.pid
    assert metrics(svc)[("productd_image_worker_restarts_total", 'worker="0"')] == 1
    assert f"image worker 0 (pid {pids[0]}) was killed by SIGKILL; restarting it" in svc.log_text()

    new_pids = [w["pid"] for w in restarted]
    assert svc.stop(signal.SIGTERM) == 0
    for pid in new_pids:
        assert "image worker stopped" in svc.log_text() and not os.path.exists(f"/proc/{pid}/stat") \
            or _zombie_or_gone(pid)
    svc.assert_no_leftovers()
    assert not temp_dir.exists()  # removed at stop


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, IndexError):
        return True


def test_no_pool_with_zero_workers(start_service, tmp_path):
    svc, data = start(start_service, tmp_path, workers=0)
    assert image_workers(svc) == []
    assert metrics(svc)[("productd_image_workers", "")] == 0
    assert (data / "images" / "jobs.sqlite3").exists()  # queued jobs wait in it


# ---- end to end: a worker of the pool does a job ----------------------------------------


class _Images(http.server.BaseHTTPRequestHandler):
    jpeg = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/photo.jpg":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(self.jpeg)))
            self.end_headers()
            self.wfile.write(self.jpeg)
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def image_server():
    out = io.BytesIO()
    PIL.new("RGB", (1600, 1200), (200, 30, 90)).save(out, "JPEG", quality=90)
    _Images.jpeg = out.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_pool_worker_does_a_queued_job_and_the_rendition_is_served(start_service, tmp_path, image_server):
    svc, data = start(start_service, tmp_path, "--image-allow-private", workers=1)
    queue = JobQueue(path_in(data))
    good = queue.enqueue(f"{image_server}/photo.jpg").id
    gone = queue.enqueue(f"{image_server}/missing.jpg").id

    def ended():
        jobs = {j["id"]: j for j in requests.get(f"{svc.url}/admin/image-jobs", timeout=TIMEOUT).json()["jobs"]}
        return jobs if jobs[good]["state"] == "done" and jobs[gone]["state"] == "dead" else None

    jobs = svc.wait_for(ended, "both jobs ended")
    assert jobs[gone]["last_reason"] == "http-404"
    rendition = jobs[good]["rendition"]
    r = requests.get(svc.url + rendition, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/webp"
    assert PIL.open(io.BytesIO(r.content)).size == (1024, 768)

    def counted():
        m = metrics(svc)
        return m if m[("productd_image_dead_lettered_total", "")] == 1 else None

    m = svc.wait_for(counted, "the dead letter counted")
    assert m[("productd_image_downloads_total", "")] == 1
    assert m[("productd_image_compressions_total", "")] == 1
    assert m[("productd_image_download_failures_total", "")] == 1 and m[("productd_image_retries_total", "")] == 0
    assert m[("productd_image_bytes_in_total", "")] == len(_Images.jpeg)
    assert m[("productd_image_bytes_out_total", "")] == len(r.content)
    assert m[("productd_image_download_seconds_count", "")] == 1
    assert m[("productd_image_compression_seconds_bucket", 'le="+Inf"')] == 1
    # The job figures are cached for a second.
    svc.wait_for(lambda: metrics(svc)[("productd_image_jobs", 'state="done"')] == 1, "done jobs counted")
    m = metrics(svc)
    assert m[("productd_image_jobs", 'state="dead"')] == 1 and m[("productd_image_jobs", 'state="queued"')] == 0
    assert m[("productd_image_jobs_readable", "")] == 1 and m[("productd_image_queue_age_seconds", "")] == 0
    queue.close()
