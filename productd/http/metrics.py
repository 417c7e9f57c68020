"""GET /metrics: the Prometheus text exposition of the whole service.

Shard figures come from the status board in shared memory, so a scrape never waits behind a
full inbox and every gunicorn worker sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import falcon

from productd.actors.client import ShardClient, ShardCounters, ShardHealth
from productd.http.stats import REJECTED_SERIES, HttpStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ShardValue = Callable[[ShardHealth, ShardCounters], object]

# Every series /metrics has for each shard, in the order it renders them: (name, type, help,
# the value for a shard, from its health and counters). The apply-delay histogram and the HTTP
# table's per-shard counter follow them; PER_SHARD_SERIES names them all. tests/service.py keeps
# its own copy of those names, as a user of /metrics would, and tests/test_layout.py holds the
# two lists equal.
SHARD_SERIES: tuple[tuple[str, str, str, ShardValue], ...] = (
    ("productd_events_received_total", "counter", "Events read from the shard's inbox.", lambda h, c: c.received),
    ("productd_events_applied_total", "counter", "Events that changed a product.", lambda h, c: c.applied),
    ("productd_events_stale_total", "counter",
     "Events ignored because their version was not newer than the stored one.", lambda h, c: c.stale),
    ("productd_reads_total", "counter", "Product reads answered by the shard.", lambda h, c: c.reads),
    ("productd_products", "gauge", "Products held by the shard.", lambda h, c: h.products),
    ("productd_shard_restarts_total", "counter", "Times the supervisor restarted the shard.",
     lambda h, c: h.restarts),
    ("productd_shard_state_lost_total", "counter",
     "Restarts after which the shard's products were gone (memory-only mode).", lambda h, c: h.state_lost),
    ("productd_commits_total", "counter", "Transactions the shard committed to its file.", lambda h, c: c.commits),
    ("productd_replies_dropped_total", "counter",
     "Replies the shard could not deliver: the asking worker was gone, or its socket was full.",
     lambda h, c: c.dropped_replies),
    ("productd_inbox_skipped_bytes_total", "counter",
     "Inbox bytes dropped to find a frame boundary after a shard died mid-frame.", lambda h, c: c.skipped_bytes),
    ("productd_inbox_bytes", "gauge", "Bytes waiting in the shard's inbox.", lambda h, c: h.inbox_bytes),
    ("productd_shard_up", "gauge", "1 while the shard is ready and went round its loop in the last 5 s.",
     lambda h, c: int(h.answering)),
    ("productd_shard_heartbeat_age_seconds", "gauge", "Seconds since the shard last went round its loop.",
     lambda h, c: f"{h.heartbeat_age:.3f}"),
    ("productd_shard_writes_refused", "gauge", "1 while the shard cannot commit and refuses writes.",
     lambda h, c: int(h.writes_refused)),
)
APPLY_DELAY = "productd_apply_delay_seconds"  # a histogram per shard
PER_SHARD_SERIES = (
    *(name for name, _, _, _ in SHARD_SERIES),
    f"{APPLY_DELAY}_bucket", f"{APPLY_DELAY}_sum", f"{APPLY_DELAY}_count",
    REJECTED_SERIES,
)


class Metrics:
    def __init__(self, client: ShardClient, stats: HttpStats) -> None:
        self.client = client
        self.stats = stats

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE
        resp.text = render(self.client, self.stats)

    on_head = on_get


def render(client: ShardClient, stats: HttpStats) -> str:
    shards = range(client.shards)
    # One snapshot of each shard, rendered series by series.
    snapshots = [(client.shard_health(s), client.shard_counters(s)) for s in shards]
    lines: list[str] = []
    for name, kind, help_text, value in SHARD_SERIES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f'{name}{{shard="{s}"}} {value(*snapshots[s])}' for s in shards)
    lines.append(f"# HELP {APPLY_DELAY} From accepting an event to its shard applying it.")
    lines.append(f"# TYPE {APPLY_DELAY} histogram")
    for s in shards:
        delay = client.apply_delay(s)
        for bound, cumulative in delay.buckets:
            lines.append(f'{APPLY_DELAY}_bucket{{shard="{s}",le="{bound}"}} {cumulative}')
        lines.append(f'{APPLY_DELAY}_sum{{shard="{s}"}} {delay.sum_seconds}')
        lines.append(f'{APPLY_DELAY}_count{{shard="{s}"}} {delay.count}')
    lines.extend(stats.render(client.shards))
    return "\n".join(lines) + "\n"
