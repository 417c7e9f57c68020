"""The status board: a small shared-memory table every process can read without asking anyone.

The supervisor maps it before it forks, so shards, the gunicorn arbiter and every worker
(including recycled ones) see the same memory. Each field has one writer: the supervisor
writes pid, state and restart counts; a shard writes its own heartbeat and counters. Fields
are aligned 64-bit integers, which x86-64 and arm64 read and write whole, so no lock is needed.
A reader may see one counter a step behind another; nothing here needs them to agree.
"""

from __future__ import annotations

import mmap
import time
from bisect import bisect_left

from productd.layout import Layout

# Shard states.
STARTING = 0  # forked, loading its products
READY = 1  # reading its inbox
DEAD = 2  # exited; the supervisor is starting another
STOPPED = 3  # drained its inbox and exited on request

STATE_NAMES = {STARTING: "starting", READY: "ready", DEAD: "dead", STOPPED: "stopped"}

# Time from a front end accepting an event to its shard applying it: a histogram with the
# bucket bounds below (seconds), then +Inf; buckets are cumulative only when rendered.
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Per-shard fields: offsets into the shard's row, in the order declared.
ROW = Layout("status board shard row")
PID = ROW.field("pid")
STATE = ROW.field("state")
HEARTBEAT_NS = ROW.field("heartbeat_ns")  # time.monotonic_ns() of the shard's last loop turn
RESTARTS = ROW.field("restarts")
STATE_LOST = ROW.field("state_lost")  # restarts that lost state (memory-only mode)
RECEIVED = ROW.field("received")  # events read from the inbox
APPLIED = ROW.field("applied")
STALE = ROW.field("stale")  # ignored: version <= stored version
PRODUCTS = ROW.field("products")
READS = ROW.field("reads")
SKIPPED_BYTES = ROW.field("skipped_bytes")  # inbox bytes dropped to find a frame boundary after a crash
WRITES_REFUSED = ROW.field("writes_refused")  # 1 while the shard cannot commit: the front end refuses writes
COMMITS = ROW.field("commits")
DROPPED_REPLIES = ROW.field("dropped_replies")  # replies whose worker thread was gone (or not reading)
DOZING = ROW.field("dozing")  # 1 while the shard lets events gather on its doorbell: a reader must ring it
APPLY_HIST = ROW.field("apply_hist", len(APPLY_BUCKETS) + 1)  # the buckets, then +Inf
APPLY_SUM_US = ROW.field("apply_sum_us")
APPLY_COUNT = ROW.field("apply_count")
# Image results (protocol.ImageResult) for a product that is gone or no longer shows the URL.
IMAGE_RESULTS_DROPPED = ROW.field("image_results_dropped")
ROW_FIELDS = ROW.size()  # whole cache lines: each row has its own writer

# Global fields, after the shard rows.
GLOBALS = Layout("status board globals")
G_STOPPING = GLOBALS.field("stopping")
GLOBAL_FIELDS = GLOBALS.size()


HEARTBEAT_STALE_S = 5.0  # an idle shard beats every second; five missed beats means stuck


class StatusBoard:
    def __init__(self, shards: int) -> None:
        self.shards = shards
        self._mem = mmap.mmap(-1, 8 * (shards * ROW_FIELDS + GLOBAL_FIELDS))
        self._q = memoryview(self._mem).cast("q")
        self._g = shards * ROW_FIELDS

    def get(self, shard: int, field: int) -> int:
        return self._q[shard * ROW_FIELDS + field]

    def set(self, shard: int, field: int, value: int) -> None:
        self._q[shard * ROW_FIELDS + field] = value

    def add(self, shard: int, field: int, delta: int) -> None:
        """Only for the field's single writer."""
        self._q[shard * ROW_FIELDS + field] += delta

    def observe_applies(self, shard: int, applied_ns: int, frames: list[tuple[int, int]]) -> None:
        """Count the events of `frames` ((accepted_at ns, events) each) applied at `applied_ns`.

        The shard's own row only.
        """
        q, row = self._q, shard * ROW_FIELDS
        total_us = count = 0
        for accepted_ns, events in frames:
            seconds = max(0, applied_ns - accepted_ns) / 1e9
            q[row + APPLY_HIST + bisect_left(APPLY_BUCKETS, seconds)] += events
            total_us += int(seconds * 1e6) * events
            count += events
        q[row + APPLY_SUM_US] += total_us
        q[row + APPLY_COUNT] += count

    def state(self, shard: int) -> int:
        return self._q[shard * ROW_FIELDS + STATE]

    def beat(self, shard: int) -> None:
        self._q[shard * ROW_FIELDS + HEARTBEAT_NS] = time.monotonic_ns()

    def heartbeat_age(self, shard: int) -> float:
        """Seconds since the shard last went round its loop."""
        return (time.monotonic_ns() - self._q[shard * ROW_FIELDS + HEARTBEAT_NS]) / 1e9

    @property
    def stopping(self) -> bool:
        return bool(self._q[self._g + G_STOPPING])

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._q[self._g + G_STOPPING] = int(value)


def answering(board: StatusBoard, shard: int) -> bool:
    """Ready, and went round its loop recently (a stopped or wedged process does not)."""
    return board.state(shard) == READY and board.heartbeat_age(shard) < HEARTBEAT_STALE_S
