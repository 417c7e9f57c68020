"""HTTP request counts and latencies of every gunicorn worker, in memory the arbiter shares.

The arbiter maps one table before it forks any worker and gives each worker a slot (in
gunicorn's pre_fork hook, where the arbiter alone decides, so two workers never share one).
A recycled worker's replacement takes over a free slot and keeps adding to its counters, so
totals never go back and the table never grows: a scrape sums the slots.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left

from productd.config import SHARDS
from productd.layout import Layout

ROUTES = ("events", "product", "healthz", "readyz", "metrics", "openapi", "other")
METHODS = ("GET", "POST", "other")
STATUSES = (200, 202, 400, 401, 404, 405, 413, 415, 422, 500, 503, 504, 0)  # 0: any other
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_SHARDS = SHARDS.high  # the most --shards takes: a rejected counter for each
REJECTED_SERIES = "productd_events_rejected_total"  # the one per-shard series this table renders

_ROUTE = {name: i for i, name in enumerate(ROUTES)}
_METHOD = {name: i for i, name in enumerate(METHODS)}
_STATUS = {code: i for i, code in enumerate(STATUSES)}

# One worker's slot: its fields in order, each a block of counters.
SLOT = Layout("HTTP stats slot")
_REQUESTS = SLOT.field("requests", len(ROUTES) * len(METHODS) * len(STATUSES))  # by route, method, status
_HIST_ROW = len(LATENCY_BUCKETS) + 3  # buckets, +Inf, sum (microseconds), count
_HIST = SLOT.field("latency", len(ROUTES) * _HIST_ROW)  # a histogram per route
_REJECTED = SLOT.field("rejected", MAX_SHARDS)  # events refused with 503, per shard
_LATE = SLOT.field("late_replies", 1)  # shard replies that came after their request had timed out
SLOT_FIELDS = SLOT.size()


class HttpStats:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, 8 * SLOT_FIELDS * slots)
        self._q = memoryview(self._mem).cast("q")
        self._base = 0  # this worker's slot offset
        # No lock: a worker's slot is written only by its event loop (work sent to a thread with
        # asyncio.to_thread never records), and other processes only read.

    # -- in the arbiter

    def assign(self, taken: set[int]) -> int:
        """A slot for the worker about to be forked: one no live worker holds.

        With every slot taken (only if workers were added at run time) the new worker shares
        slot 0; its counts may then race with another worker's.
        """
        for slot in range(self.slots):
            if slot not in taken:
                return slot
        return 0

    # -- in a worker

    def use(self, slot: int) -> None:
        self._base = slot * SLOT_FIELDS

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        q, base = self._q, self._base
        r = _ROUTE.get(route, len(ROUTES) - 1)
        m = _METHOD.get(method, len(METHODS) - 1)
        s = _STATUS.get(status, len(STATUSES) - 1)
        bucket = bisect_left(LATENCY_BUCKETS, seconds)
        hist = base + _HIST + r * _HIST_ROW
        q[base + _REQUESTS + (r * len(METHODS) + m) * len(STATUSES) + s] += 1
        q[hist + bucket] += 1
        q[hist + len(LATENCY_BUCKETS) + 1] += int(seconds * 1e6)
        q[hist + len(LATENCY_BUCKETS) + 2] += 1

    def rejected(self, shard: int, events: int) -> None:
        self._q[self._base + _REJECTED + shard] += events

    def late_reply(self) -> None:
        self._q[self._base + _LATE] += 1  # only ever called on the worker's loop

    # -- for a scrape, in any process

    def _total(self, field: int) -> int:
        q = self._q
        return sum(q[slot * SLOT_FIELDS + field] for slot in range(self.slots))

    def render(self, shards: int) -> list[str]:
        lines = [
            "# HELP productd_http_requests_total HTTP requests answered, by route, method and status.",
            "# TYPE productd_http_requests_total counter",
        ]
        for r, route in enumerate(ROUTES):
            for m, method in enumerate(METHODS):
                for s, code in enumerate(STATUSES):
                    value = self._total(_REQUESTS + (r * len(METHODS) + m) * len(STATUSES) + s)
                    if value:
                        labels = f'route="{route}",method="{method}",status="{code or "other"}"'
                        lines.append(f"productd_http_requests_total{{{labels}}} {value}")
        lines += [
            "# HELP productd_http_request_duration_seconds Time to answer an HTTP request, by route.",
            "# TYPE productd_http_request_duration_seconds histogram",
        ]
        for r, route in enumerate(ROUTES):
            hist = _HIST + r * _HIST_ROW
            count = self._total(hist + len(LATENCY_BUCKETS) + 2)
            if not count:
                continue
            cumulative = 0
            for i, bound in enumerate((*LATENCY_BUCKETS, "+Inf")):
                cumulative += self._total(hist + i)
                labels = f'route="{route}",le="{bound}"'
                lines.append(f"productd_http_request_duration_seconds_bucket{{{labels}}} {cumulative}")
            total_us = self._total(hist + len(LATENCY_BUCKETS) + 1)
            lines.append(f'productd_http_request_duration_seconds_sum{{route="{route}"}} {total_us / 1e6}')
            lines.append(f'productd_http_request_duration_seconds_count{{route="{route}"}} {count}')
        lines += [
            f"# HELP {REJECTED_SERIES} Events refused with 503 (inbox full, shard down), by shard.",
            f"# TYPE {REJECTED_SERIES} counter",
        ]
        lines += [f'{REJECTED_SERIES}{{shard="{s}"}} {self._total(_REJECTED + s)}' for s in range(shards)]
        lines += [
            "# HELP productd_late_replies_total Shard replies that arrived after their request had timed out "
            "(answered 504, or 503 in sync mode); dropped.",
            "# TYPE productd_late_replies_total counter",
            f"productd_late_replies_total {self._total(_LATE)}",
        ]
        return lines
