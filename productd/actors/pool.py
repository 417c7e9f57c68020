"""The image worker pool's board: one shared-memory row per image worker (docs/images.md, "The pool").

Like the shards' status board (actors/status.py) it is mapped by the supervisor before anything
forks, so the front end reads it without asking anyone (/readyz, /metrics). It is a table of
its own rather than more rows on the status board: the shards' rows are sized and counted by
shard everywhere (metrics, the HTTP counters), and a pool of 0 workers must cost nothing there.

Each field has one writer. The supervisor writes pid, state and restarts. The worker itself
writes its counters and histograms (from its own log records: `Recorder` below), so every
worker process has its own row and cache line, and no lock is needed.
"""

from __future__ import annotations

import logging
import mmap
from bisect import bisect_left

from productd.actors.status import DEAD, READY, STARTING, STATE_NAMES, STOPPED
from productd.layout import Layout

__all__ = ["DEAD", "READY", "STARTING", "STATE_NAMES", "STOPPED", "PoolBoard", "Recorder"]

# Download and compression times (seconds): a download is bounded by --image-total-timeout
# (30 s), a render of a 40 MP image takes a few seconds.
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

ROW = Layout("image pool row")
PID = ROW.field("pid")
STATE = ROW.field("state")
RESTARTS = ROW.field("restarts")
DOWNLOADS = ROW.field("downloads")  # bodies fetched whole
DOWNLOAD_FAILURES = ROW.field("download_failures")
RETRIES = ROW.field("retries")  # transient failures, the job to be tried again (or dead: no attempts left)
COMPRESSIONS = ROW.field("compressions")
COMPRESSION_FAILURES = ROW.field("compression_failures")
DEAD_LETTERED = ROW.field("dead_lettered")
BYTES_IN = ROW.field("bytes_in")
BYTES_OUT = ROW.field("bytes_out")
DOWNLOAD_HIST = ROW.field("download_hist", len(SECONDS_BUCKETS) + 1)
DOWNLOAD_SUM_US = ROW.field("download_sum_us")
COMPRESSION_HIST = ROW.field("compression_hist", len(SECONDS_BUCKETS) + 1)
COMPRESSION_SUM_US = ROW.field("compression_sum_us")
ROW_FIELDS = ROW.size()


class PoolBoard:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        # mmap refuses a length of 0: a pool of none still maps one (unused) row.
        self._mem = mmap.mmap(-1, 8 * ROW_FIELDS * max(1, workers))
        self._q = memoryview(self._mem).cast("q")

    def get(self, worker: int, field: int) -> int:
        return self._q[worker * ROW_FIELDS + field]

    def set(self, worker: int, field: int, value: int) -> None:
        self._q[worker * ROW_FIELDS + field] = value

    def add(self, worker: int, field: int, delta: int) -> None:
        """Only for the field's single writer."""
        self._q[worker * ROW_FIELDS + field] += delta

    def observe(self, worker: int, hist: int, sum_us: int, seconds: float) -> None:
        q, row = self._q, worker * ROW_FIELDS
        q[row + hist + bisect_left(SECONDS_BUCKETS, seconds)] += 1
        q[row + sum_us] += int(seconds * 1e6)

    def histogram(self, hist: int, sum_us: int) -> tuple[list[tuple[str, int]], float, int]:
        """The whole pool's histogram: cumulative (le, count) buckets, the sum in seconds, the count."""
        counts = [sum(self.get(w, hist + i) for w in range(self.workers)) for i in range(len(SECONDS_BUCKETS) + 1)]
        buckets, running = [], 0
        for bound, count in zip((*map(str, SECONDS_BUCKETS), "+Inf"), counts, strict=True):
            running += count
            buckets.append((bound, running))
        total_us = sum(self.get(w, sum_us) for w in range(self.workers))
        return buckets, total_us / 1e6, running

    def total(self, field: int) -> int:
        return sum(self.get(w, field) for w in range(self.workers))

    def state_name(self, worker: int) -> str:
        return STATE_NAMES.get(self.get(worker, STATE), "unknown")


class Recorder(logging.Handler):
    """Counts a worker's outcomes on its board row from the log records productd.images.worker
    writes anyway ("image downloaded", "image compressed", ... with their bytes and seconds).

    Reading the records the worker already emits keeps the counting out of the worker's loop:
    the log lines are the pipeline's documented events, so the metrics count exactly what the
    log says happened. Installed in the worker process only, on the "productd.images" logger."""

    def __init__(self, board: PoolBoard, worker: int) -> None:
        super().__init__(logging.DEBUG)
        self.board, self.worker = board, worker

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        message = record.msg if isinstance(record.msg, str) else ""
        board, w = self.board, self.worker
        if message == "image downloaded":
            board.add(w, DOWNLOADS, 1)
            board.add(w, BYTES_IN, int(fields.get("bytes_in", 0)))
            board.observe(w, DOWNLOAD_HIST, DOWNLOAD_SUM_US, float(fields.get("seconds", 0.0)))
        elif message == "image compressed":
            board.add(w, COMPRESSIONS, 1)
            board.add(w, BYTES_OUT, int(fields.get("bytes_out", 0)))
            board.observe(w, COMPRESSION_HIST, COMPRESSION_SUM_US, float(fields.get("seconds", 0.0)))
        elif message.startswith("image download failed"):
            board.add(w, DOWNLOAD_FAILURES, 1)
            if fields.get("transient"):
                board.add(w, RETRIES, 1)
        elif message.startswith("image compression failed"):
            board.add(w, COMPRESSION_FAILURES, 1)
        elif message.startswith("image job dead-lettered"):
            board.add(w, DEAD_LETTERED, 1)

    def handleError(self, record) -> None:  # noqa: N802 - logging's name
        pass  # a counter must never break the worker's log line
