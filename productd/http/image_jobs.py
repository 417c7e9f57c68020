"""The image job queue as the front end sees it: `GET /admin/image-jobs`, `POST
/admin/image-jobs/{id}/retry`, and the queue's figures for /metrics and /readyz.

The front end never keeps the job file open: each read is a short-lived read-only connection
(WAL lets it read beside the workers' writes without waiting for them), run in a thread so a
slow disk never stalls the event loop. The figures for /metrics and /readyz are cached for
`STATS_TTL`: a scraper or a load balancer polling every worker does not turn into a count over
the whole job file each time. A retry is a write, through an ordinary `JobQueue`.

With auth on (--auth-token-file), both endpoints need the token whatever --auth-reads says
(app.BearerAuth): the list shows the URLs and the errors met fetching them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote

import falcon
import orjson

from productd.http.problems import Problem
from productd.images.jobs import DEAD, STATES, Job, JobQueue

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_ID = (1 << 63) - 1  # SQLite's largest rowid
STATS_TTL = 1.0
READ_TIMEOUT = 2.0  # seconds a read waits for a lock (a checkpoint); WAL readers rarely wait at all
PARAMETERS = ("after", "limit", "state")


class ReadOnlyJobs(JobQueue):
    """A `JobQueue` over a read-only connection: its read methods (list, get, counts,
    oldest_due_age), and none of its writes (SQLite refuses them)."""

    def __init__(self, path: str | Path) -> None:  # not JobQueue's: it would create the schema
        self.path = Path(path)
        self.clock = time.time
        self.db = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True, timeout=READ_TIMEOUT,
                                  isolation_level=None)


class JobFile:
    """Reads (in a thread, on a connection of their own) and the cached figures of one job file."""

    def __init__(self, images) -> None:
        self.images = images  # productd.images.settings.ImageSettings
        self.path = images.jobs_path
        self._stats: dict | None = None
        self._stats_at = -STATS_TTL
        self._lock = asyncio.Lock()

    def _read(self, fn):
        jobs = ReadOnlyJobs(self.path)
        try:
            return fn(jobs)
        finally:
            jobs.close()

    async def read(self, fn):
        return await asyncio.to_thread(self._read, fn)

    async def stats(self) -> dict | None:
        """{"counts": {state: n}, "oldest_due_age": s, "running": {worker: job id}}, at most
        STATS_TTL old; None when the job file cannot be read (named in the log once per TTL)."""
        async with self._lock:
            now = time.monotonic()
            if now - self._stats_at >= STATS_TTL:
                try:
                    self._stats = await self.read(_stats)
                except sqlite3.Error:
                    self._stats = None
                self._stats_at = now
            return self._stats

    async def retry(self, job_id: int) -> tuple[Job | None, Job | None]:
        """(the re-driven job, None) or (None, the job as it is: not dead, or None: unknown)."""
        def run():
            s = self.images
            jobs = JobQueue(self.path, s.max_attempts, s.backoff())
            try:
                retried = jobs.retry(job_id)
                return (retried, None) if retried is not None else (None, jobs.get(job_id))
            finally:
                jobs.close()

        return await asyncio.to_thread(run)


def _stats(jobs: ReadOnlyJobs) -> dict:
    running = dict(jobs.db.execute("SELECT lease_owner, id FROM jobs WHERE state = 'running' "
                                   "AND lease_owner IS NOT NULL ORDER BY id"))
    return {"counts": jobs.counts(), "oldest_due_age": jobs.oldest_due_age(), "running": running}


def _time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1e6):06d}Z"


def job_json(job: Job, products: list[str] | None = None) -> dict:
    """A job as the admin endpoints show it (the lease token, which could finish the job, is not shown)."""
    doc = {
        "id": job.id,
        "url": job.url,
        "state": job.state,
        "attempts": job.attempts,
        "last_reason": job.last_reason,
        "last_error": job.last_error,
        "created_at": _time(job.created_at),
        "updated_at": _time(job.updated_at),
        # When a queued or failed job is due, or a running one's lease expires.
        "next_attempt_at": _time(job.next_attempt_at) if job.state != "done" and job.state != DEAD else None,
        "worker": job.lease_owner,
        "source_bytes": job.source_bytes,
        "rendition": f"/images/{job.result_key}" if job.result_key else None,
    }
    if products is not None:
        doc["product_ids"] = products
    return doc


def _parse_list_query(query_string: str) -> tuple[str | None, int, int]:
    values: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for name, value in parse_qsl(query_string or "", keep_blank_values=True):
        if name in values:
            problems.append((name, "is given more than once"))
        values[name] = value
    for name in sorted(set(values) - set(PARAMETERS))[:20]:
        problems.append((name, "is not a parameter of this list, which takes " + ", ".join(PARAMETERS)))
    state = values.get("state")
    if state is not None and state not in STATES:
        problems.append(("state", f"must be one of {', '.join(STATES)}"))
    after = 0
    if "after" in values:
        text = values["after"]
        if not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= MAX_ID):
            problems.append(("after", "must be a job id (an integer from 0), the last one of the previous page"))
        else:
            after = int(text)
    limit = DEFAULT_LIMIT
    if "limit" in values:
        text = values["limit"]
        if not (text.isascii() and text.isdigit() and len(text) <= 7 and 1 <= int(text) <= MAX_LIMIT):
            problems.append(("limit", f"must be an integer from 1 to {MAX_LIMIT}"))
        else:
            limit = int(text)
    if problems:
        raise Problem(400, "Invalid query", "; ".join(f"{name[:64]}: {detail}" for name, detail in problems),
                      kind="invalid-query",
                      parameters=[{"name": name[:64], "detail": detail} for name, detail in problems])
    return state, after, limit


def _unavailable(exc: Exception) -> Problem:
    return Problem(503, "Image jobs unavailable", f"the image job file cannot be read: {exc}",
                   headers={"Retry-After": "1"})


class ImageJobs:
    """GET /admin/image-jobs?state=&after=&limit=: jobs in id order, a page at a time."""

    def __init__(self, jobs: JobFile) -> None:
        self.jobs = jobs

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        state, after, limit = _parse_list_query(req.query_string)

        def page(jobs: ReadOnlyJobs):
            found = jobs.list(state, after, limit + 1)  # one more: is there a next page?
            return [(job, jobs.products_of(job.id)) for job in found[:limit]], len(found) > limit

        try:
            found, more = await self.jobs.read(page)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from None
        resp.data = orjson.dumps({
            "jobs": [job_json(job, products) for job, products in found],
            "next_after": found[-1][0].id if more and found else None,
        })


class ImageJobRetry:
    """POST /admin/image-jobs/{job_id}/retry: a dead job queued again with a fresh count of attempts."""

    def __init__(self, jobs: JobFile) -> None:
        self.jobs = jobs

    async def on_post(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        if not (job_id.isascii() and job_id.isdigit() and len(job_id) <= 19 and 1 <= int(job_id) <= MAX_ID):
            raise Problem(404, "Not found", f"{job_id[:64]!r} is not an image job id (an integer from 1)",
                          kind="not-found")
        try:
            retried, current = await self.jobs.retry(int(job_id))
        except sqlite3.Error as exc:
            raise _unavailable(exc) from None
        if retried is not None:
            resp.data = orjson.dumps(job_json(retried))
            return
        if current is None:
            raise Problem(404, "Not found", f"no image job {job_id}", kind="not-found")
        raise Problem(409, "Not dead", f"image job {job_id} is {current.state}; only a dead job can be retried",
                      kind="job-not-dead", state=current.state)
