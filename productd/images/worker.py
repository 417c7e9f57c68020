"""The loop one image worker process runs: take a job, fetch, render, store, record, repeat.

`run_worker(settings)` is what the supervisor will fork, as it forks a shard (docs/images.md,
"The pool"): it lowers its own priority (nice + SCHED_BATCH, so the pool never starves the
front end), opens its own connection to the job file, and runs until SIGTERM, finishing the
job in hand first (bounded by the download's total time limit). Killed outright, it leaves at
most one job running, whose lease expires and which another worker then takes again.

A job's outcome, once recorded, goes to `on_outcome(job, products, stored)` (a no-op for now):
the integration session makes it the message to each waiting product's shard.

`python -m productd.images.worker --data-dir DIR [--allow-private] ...` runs one worker in the
foreground (the tests run it so; also handy to drain a queue by hand).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import fields

from productd import logs
from productd.images.fetch import FetchError, fetch
from productd.images.jobs import DEAD, DONE, Job, JobQueue, Stored
from productd.images.objects import DirectoryStore
from productd.images.render import RenderError, render
from productd.images.settings import ImageSettings

log = logging.getLogger("productd.images")

EXIT_OK = 0
STOP_POLL = 0.1  # seconds: how soon an idle worker notices SIGTERM


def lower_priority(nice: int) -> None:
    """Yield the CPU to the front end and the shards: a higher niceness, and batch scheduling
    (no wake-up preemption of a running front-end thread). Best effort: not Linux, no change."""
    try:
        if nice:
            os.nice(nice)
    except OSError:
        pass
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass


class InternalError(Exception):
    """Something in the worker itself went wrong: counted as a transient failed attempt."""

    reason = "internal"
    transient = True
    retry_after = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Worker:
    def __init__(self, settings: ImageSettings, name: str | None = None,
                 on_outcome: Callable[[Job, list[str], Stored | None], None] | None = None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.queue = JobQueue(settings.jobs_path, settings.max_attempts, settings.backoff())
        self.store = DirectoryStore(settings.images_dir)
        self.limits = settings.limits()
        self.on_outcome = on_outcome or (lambda job, products, stored: None)
        self.stopping = False

    def run(self, until_idle: bool = False) -> int:
        """Work until asked to stop (or, with `until_idle`, until no job is due)."""
        while not self.stopping:
            try:
                job = self.queue.take(self.name, self.settings.lease)
            except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk trouble
                log.error("image worker cannot take a job: %s", exc, extra={"fields": {"worker": self.name}})
                self._idle(1.0)
                continue
            if job is None:
                if until_idle:
                    break
                self._idle(self.settings.idle_wait)
                continue
            self.process(job)
        return EXIT_OK

    def close(self) -> None:
        self.queue.close()

    def _idle(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and (left := end - time.monotonic()) > 0:
            time.sleep(min(STOP_POLL, left))

    def process(self, job: Job) -> str | None:
        """Do one leased job; its new state (None if the lease was lost meanwhile)."""
        products = self.queue.products_of(job.id)
        context = {"job_id": job.id, "url": job.url, "product_ids": products, "attempt": job.attempts,
                   "worker": self.name}
        try:
            return self._process(job, products, context)
        except Exception as exc:  # a bug, a full disk, a locked job file: retried like a transient failure
            log.exception("image job failed inside the worker", extra={"fields": context})
            try:
                return self._failed(job, products, context, InternalError(f"{type(exc).__name__}: {exc}"))
            except sqlite3.Error:  # the lease expires and the job is taken again
                return None

    def _process(self, job: Job, products: list[str], context: dict) -> str | None:
        s = self.settings
        started = time.monotonic()
        try:
            download = fetch(job.url, self.limits)
        except FetchError as exc:
            log.warning("image download failed: %s", exc.detail, extra={"fields": {
                **context, "reason": exc.reason, "transient": exc.transient,
                "seconds": round(time.monotonic() - started, 3)}})
            return self._failed(job, products, context, exc)
        downloaded = time.monotonic()
        source_sha256 = hashlib.sha256(download.body).hexdigest()
        log.info("image downloaded", extra={"fields": {
            **context, "bytes_in": len(download.body), "seconds": round(downloaded - started, 3),
            "redirects": download.redirects, "address": download.address}})
        stored = self.queue.rendition_for_source(source_sha256)
        if stored is None or not self.store.exists(stored.key):
            try:
                rendition = render(download.body, s.max_side, s.max_pixels, s.quality)
            except RenderError as exc:
                log.warning("image compression failed: %s", exc.detail, extra={"fields": {
                    **context, "reason": exc.reason, "bytes_in": len(download.body)}})
                return self._failed(job, products, context, exc)
            key = self.store.put(rendition.data, rendition.format)
            stored = Stored(key, rendition.format, rendition.width, rendition.height, rendition.bytes,
                            source_sha256, rendition.source_format, rendition.source_width,
                            rendition.source_height, time.time())
            log.info("image compressed", extra={"fields": {
                **context, "key": key, "bytes_in": len(download.body), "bytes_out": rendition.bytes,
                "width": rendition.width, "height": rendition.height,
                "seconds": round(time.monotonic() - downloaded, 3)}})
        if not self.queue.complete(job, stored, len(download.body)):
            log.warning("image job lease lost before it was recorded done; the newer attempt decides",
                        extra={"fields": context})
            return None
        self.on_outcome(job, products, stored)
        return DONE

    def _failed(self, job: Job, products: list[str], context: dict,
                exc: FetchError | RenderError | InternalError) -> str | None:
        state = self.queue.fail(job, exc.reason, exc.detail, exc.transient, exc.retry_after)
        if state == DEAD:
            log.error("image job dead-lettered: %s", exc.detail, extra={"fields": {**context, "reason": exc.reason}})
            self.on_outcome(job, products, None)
        elif state is None:
            log.warning("image job lease lost before its failure was recorded", extra={"fields": context})
        return state


def run_worker(settings: ImageSettings, name: str | None = None) -> int:
    """The body of one image worker process; returns its exit code (0 after SIGTERM)."""
    lower_priority(settings.nice)
    worker = Worker(settings, name)

    def stop(signum, frame) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("image worker started", extra={"fields": {"worker": worker.name, "jobs": settings.jobs_path}})
    try:
        code = worker.run()
    finally:
        worker.close()
    log.info("image worker stopped", extra={"fields": {"worker": worker.name}})
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m productd.images.worker", description=__doc__.split("\n")[0])
    for f in fields(ImageSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true")
        elif f.name == "allow_networks":
            parser.add_argument(flag, default=(), type=lambda text: tuple(n for n in text.split(",") if n))
        else:
            parser.add_argument(flag, default=f.default, type=type(f.default))
    parser.add_argument("--name", default=None, help="the worker's name in leases and logs")
    parser.add_argument("--log-format", default="json", choices=("json", "text"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    name, log_format = args.pop("name"), args.pop("log_format")
    logs.setup("info", log_format)
    logs.set_role("image-worker")
    return run_worker(ImageSettings(**args), name)


if __name__ == "__main__":
    sys.exit(main())
