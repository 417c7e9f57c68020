"""The durable image job queue: one SQLite file, `<data-dir>/images/jobs.sqlite3`, in WAL mode.

One job per image URL, whatever the number of products that show it. A job's life:

    queued --take--> running --complete--> done
                        |  \\--fail (transient, attempts left)--> failed --(next_attempt_at)--> running ...
                        |   \\-fail (permanent, or no attempts left)--> dead --retry--> queued
                        \\--lease expired (the worker died)--> taken again, as if failed

`take` is one `BEGIN IMMEDIATE` transaction whose `UPDATE ... WHERE id = (SELECT ...)
RETURNING` moves one due job to running under a fresh lease token: SQLite lets one writer in
at a time, so two workers never take the same job. A worker that is killed mid-job leaves its
job running with a lease that expires; the next `take` after that hands it out again. Every
take counts as an attempt, so an image that kills its worker each time ends dead too.
`complete` and `fail` name the lease token: a worker whose lease expired and whose job was
taken again cannot overwrite the newer attempt's outcome.

Results are kept twice: `jobs.result_key` by URL (an URL already done is never fetched again:
`enqueue` answers its rendition at once) and `renditions` by the stored object's key (the
SHA-256 of the WebP) with `source_sha256` indexed (two URLs serving the same bytes are rendered
once). `job_products` records which products asked for a URL, for the shard messages the
worker sends when the job ends (docs/images.md, "Reaching the product").

Commits are `synchronous=FULL`: a job acknowledged as queued survives a power cut, not only
kill -9. Times are Unix seconds (wall clock: leases and backoff must mean the same thing in
every process and after a restart).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED, DEAD = "queued", "running", "done", "failed", "dead"
STATES = (QUEUED, RUNNING, DONE, FAILED, DEAD)
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    url TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN {STATES!r}),
    attempts INTEGER NOT NULL DEFAULT 0,
    last_reason TEXT,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires_at REAL,
    source_sha256 TEXT,
    source_bytes INTEGER,
    result_key TEXT REFERENCES renditions(key)
);
-- The jobs a take may hand out, by when: queued, failed (next attempt) and running (lease expiry).
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (next_attempt_at) WHERE state IN ('queued', 'failed', 'running');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS renditions (
    key TEXT PRIMARY KEY,
    format TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    source_sha256 TEXT NOT NULL,
    source_format TEXT,
    source_width INTEGER,
    source_height INTEGER,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS renditions_source ON renditions (source_sha256);
CREATE TABLE IF NOT EXISTS job_products (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    product_id TEXT NOT NULL,
    PRIMARY KEY (job_id, product_id)
) WITHOUT ROWID;
-- Products shown a dead job's failure: a retry of the job makes them wait for it again.
CREATE TABLE IF NOT EXISTS failed_products (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    product_id TEXT NOT NULL,
    PRIMARY KEY (job_id, product_id)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Job:
    id: int
    url: str
    state: str
    attempts: int
    last_reason: str | None
    last_error: str | None
    created_at: float
    updated_at: float
    next_attempt_at: float
    lease_owner: str | None
    lease_token: str | None
    lease_expires_at: float | None
    source_sha256: str | None
    source_bytes: int | None
    result_key: str | None


@dataclass(frozen=True)
class Stored:
    """A rendition as the renditions table holds it."""

    key: str
    format: str
    width: int
    height: int
    bytes: int
    source_sha256: str
    source_format: str | None
    source_width: int | None
    source_height: int | None
    created_at: float


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1 after n failed ones: base * 2**(n-1), at most `cap`, then a
    random factor in [1 - jitter, 1] so workers that failed together do not retry together."""

    base: float = 2.0
    cap: float = 600.0
    jitter: float = 0.5

    def delay(self, attempts: int, retry_after: float | None = None, rng=random.random) -> float:
        delay = min(self.cap, self.base * 2 ** max(0, attempts - 1))
        delay *= 1 - self.jitter * rng()
        if retry_after is not None:  # the server said when; within reason
            delay = max(delay, min(retry_after, self.cap))
        return delay


def path_in(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "images" / "jobs.sqlite3"


# The next job a take hands out. The states are literals, and the index is named, so that SQLite
# reads the partial index (an index on state alone looks as good to it on a small file).
NEXT_DUE = ("SELECT id FROM jobs INDEXED BY jobs_pending WHERE state IN ('queued', 'failed', 'running') "
            "AND next_attempt_at <= :now ORDER BY next_attempt_at, id LIMIT 1")
_COLUMNS = "id, url, state, attempts, last_reason, last_error, created_at, updated_at, next_attempt_at, " \
           "lease_owner, lease_token, lease_expires_at, source_sha256, source_bytes, result_key"


class JobQueue:
    """One process's connection to the job file (open one per process, after any fork)."""

    def __init__(self, path: str | os.PathLike, max_attempts: int = 5, backoff: Backoff = Backoff(),
                 clock=time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.clock = clock
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                                  check_same_thread=False)
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("PRAGMA foreign_keys = ON")
        with self._write():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"{self.path}: schema {version} is newer than this productd's "
                                            f"{SCHEMA_VERSION}")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    # ---- transactions -------------------------------------------------------------------

    def _write(self):
        return _Immediate(self.db)

    # ---- producers ----------------------------------------------------------------------

    def enqueue(self, url: str, product_id: str | None = None) -> Job:
        """The job for `url`, created queued if there is none; `product_id` is remembered as one
        of the products waiting for it. A URL already known keeps its job (done stays done)."""
        now = self.clock()
        with self._write():
            self.db.execute(
                "INSERT INTO jobs (url, state, created_at, updated_at, next_attempt_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (url) DO NOTHING", (url, QUEUED, now, now, now))
            job = self._job_by_url(url)
            if product_id is not None:
                self.db.execute("INSERT OR IGNORE INTO job_products (job_id, product_id) VALUES (?, ?)",
                                (job.id, product_id))
        return job

    def enqueue_many(self, pairs) -> list[tuple[str, str, tuple]]:
        """Enqueue (url, product_id) pairs in one transaction (a shard's commit). A URL whose job
        has ended already is not waited for: its (product_id, url, result) is returned for the
        shard to apply at once, and no job_products row is left for it (a row from before, such
        as one a worker without an inbox could not deliver, is deleted)."""
        now = self.clock()
        ended = []
        with self._write():
            for url, product_id in pairs:
                self.db.execute(
                    "INSERT INTO jobs (url, state, created_at, updated_at, next_attempt_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (url) DO NOTHING", (url, QUEUED, now, now, now))
                job = self._job_by_url(url)
                result = self.result_of(job)
                if result is not None:  # applied by the shard now: a row left by an earlier ask waits no more
                    ended.append((product_id, url, result))
                    self._shown(job, product_id)
                else:
                    self.db.execute("INSERT OR IGNORE INTO job_products (job_id, product_id) VALUES (?, ?)",
                                    (job.id, product_id))
        return ended

    def result_of(self, job: Job) -> tuple | None:
        """What a product shows for an ended job (protocol.ImageResult's result), None while it
        is not ended: ("done", key, format, width, height, bytes) or ("failed", reason)."""
        if job.state == DONE and job.result_key is not None:
            r = self.rendition(job.result_key)
            if r is not None:
                return ("done", r.key, r.format, r.width, r.height, r.bytes)
        if job.state == DEAD:
            return ("failed", job.last_reason or "dead")
        return None

    def undelivered(self, limit: int = 100) -> list[tuple[Job, str]]:
        """(ended job, product id) pairs whose result message is not known to be in the product's
        inbox yet: a worker killed between recording the end and sending, or an inbox that was full."""
        rows = self.db.execute(
            f"SELECT {', '.join('j.' + c.strip() for c in _COLUMNS.split(','))}, p.product_id "
            f"FROM job_products p JOIN jobs j ON j.id = p.job_id WHERE j.state IN ('done', 'dead') "
            f"ORDER BY p.job_id LIMIT ?", (limit,))
        return [(Job(*row[:-1]), row[-1]) for row in rows]

    def delivered(self, job_id: int, product_id: str) -> None:
        """The result for `product_id` is in its shard's inbox: forget that it waits."""
        with self._write():
            self._shown(self.get(job_id), product_id)

    def _shown(self, job: Job | None, product_id: str) -> None:
        """`product_id` waits for `job` no more; if the job is dead, remember it for a retry."""
        self.db.execute("DELETE FROM job_products WHERE job_id = ? AND product_id = ?", (job.id, product_id))
        if job.state == DEAD:
            self.db.execute("INSERT OR IGNORE INTO failed_products (job_id, product_id) VALUES (?, ?)",
                            (job.id, product_id))

    # ---- workers ------------------------------------------------------------------------

    def take(self, owner: str, lease_seconds: float) -> Job | None:
        """Lease the next due job to `owner`, or None when none is due.

        A running job's next_attempt_at is its lease expiry, so one partial index orders every
        job that can be handed out (the states are literals so that SQLite uses it)."""
        now = self.clock()
        with self._write():
            # A job whose lease ran out with no attempts left: its worker died on it every time.
            self.db.execute(
                "UPDATE jobs INDEXED BY jobs_pending SET state = 'dead', last_reason = 'worker-lost', "
                "last_error = 'the worker holding it stopped before finishing, on every attempt', "
                "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = ? "
                "WHERE state IN ('queued', 'failed', 'running') AND next_attempt_at <= ? "
                "AND state = 'running' AND attempts >= ?",
                (now, now, self.max_attempts))
            row = self.db.execute(
                f"UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = :owner, "
                f"lease_token = :token, lease_expires_at = :expiry, next_attempt_at = :expiry, updated_at = :now, "
                f"last_reason = CASE WHEN state = 'running' THEN 'lease-expired' ELSE last_reason END, "
                f"last_error = CASE WHEN state = 'running' THEN 'taken again: ' || lease_owner || ' did not finish it' "
                f"ELSE last_error END "
                f"WHERE id = ({NEXT_DUE}) RETURNING {_COLUMNS}",
                {"now": now, "owner": owner, "token": uuid.uuid4().hex, "expiry": now + lease_seconds}).fetchone()
        return None if row is None else Job(*row)

    def extend(self, job: Job, lease_seconds: float) -> bool:
        """Push the lease of a job still held on; False if it was lost."""
        now = self.clock()
        with self._write():
            cursor = self.db.execute(
                "UPDATE jobs SET lease_expires_at = ?, next_attempt_at = ? "
                "WHERE id = ? AND state = 'running' AND lease_token = ?",
                (now + lease_seconds, now + lease_seconds, job.id, job.lease_token))
        return cursor.rowcount == 1

    def rendition_for_source(self, source_sha256: str) -> Stored | None:
        row = self.db.execute("SELECT * FROM renditions WHERE source_sha256 = ? LIMIT 1",
                              (source_sha256,)).fetchone()
        return None if row is None else Stored(*row)

    def complete(self, job: Job, stored: Stored, source_bytes: int) -> bool:
        """Record the job done with `stored`; False (and nothing written) if its lease was lost."""
        now = self.clock()
        with self._write():
            self.db.execute(
                "INSERT INTO renditions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (stored.key, stored.format, stored.width, stored.height, stored.bytes, stored.source_sha256,
                 stored.source_format, stored.source_width, stored.source_height, now))
            cursor = self.db.execute(
                "UPDATE jobs SET state = ?, result_key = ?, source_sha256 = ?, source_bytes = ?, "
                "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = ?, "
                "last_reason = NULL, last_error = NULL WHERE id = ? AND state = ? AND lease_token = ?",
                (DONE, stored.key, stored.source_sha256, source_bytes, now, job.id, RUNNING, job.lease_token))
        return cursor.rowcount == 1

    def fail(self, job: Job, reason: str, detail: str, transient: bool,
             retry_after: float | None = None) -> str | None:
        """Record a failed attempt: the job's new state (failed: retried later; dead), or None
        if the lease was lost."""
        now = self.clock()
        dead = not transient or job.attempts >= self.max_attempts
        if dead and transient:
            detail = f"{detail} (after {job.attempts} attempts)"
        state = DEAD if dead else FAILED
        next_at = now if dead else now + self.backoff.delay(job.attempts, retry_after)
        with self._write():
            cursor = self.db.execute(
                "UPDATE jobs SET state = ?, last_reason = ?, last_error = ?, next_attempt_at = ?, updated_at = ?, "
                "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL "
                "WHERE id = ? AND state = ? AND lease_token = ?",
                (state, reason, detail[:2000], next_at, now, job.id, RUNNING, job.lease_token))
        return state if cursor.rowcount == 1 else None

    # ---- administration -----------------------------------------------------------------

    def retry(self, job_id: int) -> Job | None:
        """Re-drive a dead job: queued, due now, with a fresh count of attempts, and the products
        that were shown its failure waiting for it again. None if it is not dead (or unknown)."""
        now = self.clock()
        with self._write():
            row = self.db.execute(
                f"UPDATE jobs SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ? "
                f"WHERE id = ? AND state = ? RETURNING {_COLUMNS}", (QUEUED, now, now, job_id, DEAD)).fetchone()
            if row is not None:
                self.db.execute("INSERT OR IGNORE INTO job_products (job_id, product_id) "
                                "SELECT job_id, product_id FROM failed_products WHERE job_id = ?", (job_id,))
                self.db.execute("DELETE FROM failed_products WHERE job_id = ?", (job_id,))
        return None if row is None else Job(*row)

    def get(self, job_id: int) -> Job | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job(*row)

    def by_url(self, url: str) -> Job | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE url = ?", (url,)).fetchone()
        return None if row is None else Job(*row)

    def _job_by_url(self, url: str) -> Job:
        job = self.by_url(url)
        assert job is not None
        return job

    def rendition(self, key: str) -> Stored | None:
        row = self.db.execute("SELECT * FROM renditions WHERE key = ?", (key,)).fetchone()
        return None if row is None else Stored(*row)

    def products_of(self, job_id: int) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT product_id FROM job_products WHERE job_id = ? ORDER BY product_id", (job_id,))]

    def list(self, state: str | None = None, after_id: int = 0, limit: int = 100) -> list[Job]:
        """Jobs in id order, optionally of one state; page with `after_id` = the last id seen."""
        if state is not None and state not in STATES:
            raise ValueError(f"{state!r} is not one of {', '.join(STATES)}")
        where, args = "id > ?", [after_id]
        if state is not None:
            where += " AND state = ?"
            args.append(state)
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {where} ORDER BY id LIMIT ?", (*args, limit))
        return [Job(*row) for row in rows]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        counts.update(self.db.execute("SELECT state, count(*) FROM jobs GROUP BY state"))
        return counts

    def oldest_due_age(self) -> float:
        """Seconds the longest-waiting due job has waited (queue age; 0 when none waits)."""
        now = self.clock()
        row = self.db.execute("SELECT min(next_attempt_at) FROM jobs INDEXED BY jobs_pending "
                              "WHERE state IN ('queued', 'failed', 'running') "
                              "AND next_attempt_at <= ?", (now,)).fetchone()
        return 0.0 if row[0] is None else now - row[0]


class _Immediate:
    """`with` block = one BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False
