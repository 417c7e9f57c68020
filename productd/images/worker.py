"""The loop one image worker process runs: take a job, fetch, render, store, record, repeat.

`run_worker(settings)` is what the supervisor will fork, as it forks a shard (docs/images.md,
"The pool"): it lowers its own priority (nice + SCHED_BATCH, so the pool never starves the
front end), opens its own connection to the job file, and runs until SIGTERM, finishing the
job in hand first (bounded by the download's total time limit). Killed outright, it leaves at
most one job running, whose lease expires and which another worker then takes again.

A job's end (done or dead), once recorded, is sent to each product waiting for it through
`sender` (productd.images.results.ResultSender: one protocol.ImageResult into the product's
shard inbox); each job_products row is deleted only after its message is in the inbox, and on
start and when idle the worker re-sends for ended jobs with rows left (a worker killed between
recording and sending, an inbox that stayed full): delivery is at least once, and the shard
applies a result twice to no effect. With no sender (tests, `python -m`), the rows stay for a
worker that has one. `on_outcome(job, products, stored)` is still called for tests.

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
RESEND_EVERY = 5.0  # seconds between an idle worker's looks for ended jobs whose results are not delivered


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
                 on_outcome: Callable[[Job, list[str], Stored | None], None] | None = None,
                 sender=None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.queue = JobQueue(settings.jobs_path, settings.max_attempts, settings.backoff())
        self.store = DirectoryStore(settings.images_dir)
        self.limits = settings.limits()
        self.on_outcome = on_outcome or (lambda job, products, stored: None)
        self.sender = sender
        self.next_resend = 0.0  # at once: a predecessor may have died between recording and sending
        self.stopping = False

    def deliver(self, job_id: int) -> int:
        """Send an ended job's result to every product still waiting for it; the rows of those
        whose message is in the inbox are deleted. The number sent."""
        if self.sender is None:
            return 0
        job = self.queue.get(job_id)
        result = None if job is None else self.queue.result_of(job)
        if result is None:
            return 0
        sent = 0
        for product_id in self.queue.products_of(job_id):  # read after the end: none asked too late is missed
            if self.sender.send(product_id, job.url, result):
                self.queue.delivered(job_id, product_id)
                sent += 1
            else:
                log.warning("image result not delivered: the shard's inbox stayed full; sent again later",
                            extra={"fields": {"job_id": job_id, "url": job.url, "product_id": product_id}})
        return sent

    def resend(self) -> int:
        """Deliver what ended jobs still owe their products (see `deliver`)."""
        if self.sender is None:
            return 0
        sent = 0
        for job_id in sorted({job.id for job, _ in self.queue.undelivered()}):
            sent += self.deliver(job_id)
        return sent

    def _resend_if_due(self) -> None:
        now = time.monotonic()
        if self.sender is None or now < self.next_resend:
            return
        self.next_resend = now + RESEND_EVERY
        try:
            sent = self.resend()
        except sqlite3.Error as exc:
            log.error("image worker cannot re-send results: %s", exc, extra={"fields": {"worker": self.name}})
            return
        if sent:
            log.info("image results re-sent", extra={"fields": {"worker": self.name, "sent": sent}})

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
                self._resend_if_due()
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
        self._deliver(job)
        return DONE

    def _deliver(self, job: Job) -> None:
        try:
            self.deliver(job.id)
        except (sqlite3.Error, OSError) as exc:  # the rows stay: the idle re-send delivers them
            log.error("image result delivery failed: %s", exc, extra={"fields": {"job_id": job.id, "url": job.url}})

    def _failed(self, job: Job, products: list[str], context: dict,
                exc: FetchError | RenderError | InternalError) -> str | None:
        state = self.queue.fail(job, exc.reason, exc.detail, exc.transient, exc.retry_after)
        if state == DEAD:
            log.error("image job dead-lettered: %s", exc.detail, extra={"fields": {**context, "reason": exc.reason}})
            self.on_outcome(job, products, None)
            self._deliver(job)
        elif state is None:
            log.warning("image job lease lost before its failure was recorded", extra={"fields": context})
        return state


def run_worker(settings: ImageSettings, name: str | None = None, sender=None) -> int:
    """The body of one image worker process; returns its exit code (0 after SIGTERM). `sender`
    (a productd.images.results.ResultSender) takes the results to the shards; None: not sent."""
    lower_priority(settings.nice)
    worker = Worker(settings, name, sender=sender)

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
