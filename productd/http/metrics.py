"""GET /metrics: the Prometheus text exposition of the whole service.

Shard figures come from the status board in shared memory, so a scrape never waits behind a
full inbox and every gunicorn worker sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import falcon

from productd.actors import status
from productd.actors.client import ShardClient
from productd.http.stats import REJECTED_SERIES, HttpStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _board(field: int) -> Callable[[ShardClient, int], object]:
    return lambda client, shard: client.board.get(shard, field)


# Every series /metrics has for each shard, in the order it renders them: (name, type, help,
# the value for a shard). The apply-delay histogram and the HTTP table's per-shard counter
# follow them; PER_SHARD_SERIES names them all. tests/service.py keeps its own copy of those
# names, as a user of /metrics would, and tests/test_layout.py holds the two lists equal.
SHARD_SERIES: tuple[tuple[str, str, str, Callable[[ShardClient, int], object]], ...] = (
    ("productd_events_received_total", "counter", "Events read from the shard's inbox.", _board(status.RECEIVED)),
    ("productd_events_applied_total", "counter", "Events that changed a product.", _board(status.APPLIED)),
    ("productd_events_stale_total", "counter",
     "Events ignored because their version was not newer than the stored one.", _board(status.STALE)),
    ("productd_reads_total", "counter", "Product reads answered by the shard.", _board(status.READS)),
    ("productd_products", "gauge", "Products held by the shard.", _board(status.PRODUCTS)),
    ("productd_shard_restarts_total", "counter", "Times the supervisor restarted the shard.",
     _board(status.RESTARTS)),
    ("productd_shard_state_lost_total", "counter",
     "Restarts after which the shard's products were gone (memory-only mode).", _board(status.STATE_LOST)),
    ("productd_commits_total", "counter", "Transactions the shard committed to its file.", _board(status.COMMITS)),
    ("productd_replies_dropped_total", "counter",
     "Replies the shard could not deliver: the asking worker was gone, or its socket was full.",
     _board(status.DROPPED_REPLIES)),
    ("productd_inbox_skipped_bytes_total", "counter",
     "Inbox bytes dropped to find a frame boundary after a shard died mid-frame.", _board(status.SKIPPED_BYTES)),
    ("productd_inbox_bytes", "gauge", "Bytes waiting in the shard's inbox.",
     lambda client, shard: client.inbox_bytes(shard)),
    ("productd_shard_up", "gauge", "1 while the shard is ready and went round its loop in the last 5 s.",
     lambda client, shard: int(status.answering(client.board, shard))),
    ("productd_shard_heartbeat_age_seconds", "gauge", "Seconds since the shard last went round its loop.",
     lambda client, shard: f"{client.board.heartbeat_age(shard):.3f}"),
    ("productd_shard_writes_refused", "gauge", "1 while the shard cannot commit and refuses writes.",
     _board(status.WRITES_REFUSED)),
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
    board = client.board
    shards = range(client.shards)
    lines: list[str] = []
    for name, kind, help_text, value in SHARD_SERIES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f'{name}{{shard="{s}"}} {value(client, s)}' for s in shards)
    lines.append(f"# HELP {APPLY_DELAY} From accepting an event to its shard applying it.")
    lines.append(f"# TYPE {APPLY_DELAY} histogram")
    for s in shards:
        cumulative = 0
        for i, bound in enumerate((*status.APPLY_BUCKETS, "+Inf")):
            cumulative += board.get(s, status.APPLY_HIST + i)
            lines.append(f'{APPLY_DELAY}_bucket{{shard="{s}",le="{bound}"}} {cumulative}')
        lines.append(f'{APPLY_DELAY}_sum{{shard="{s}"}} {board.get(s, status.APPLY_SUM_US) / 1e6}')
        lines.append(f'{APPLY_DELAY}_count{{shard="{s}"}} {board.get(s, status.APPLY_COUNT)}')
    lines.extend(stats.render(client.shards))
    return "\n".join(lines) + "\n"
