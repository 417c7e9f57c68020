"""GET /metrics: the Prometheus text exposition of the whole service.

Shard figures come from the status board in shared memory, so a scrape never waits behind a
full inbox and every gunicorn worker sees the same numbers.
"""

from __future__ import annotations

import falcon

from productd.actors import status
from productd.actors.client import ShardClient
from productd.http.stats import HttpStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric name, type, help, status board field)
SHARD_SERIES = (
    ("productd_events_received_total", "counter", "Events read from the shard's inbox.", status.RECEIVED),
    ("productd_events_applied_total", "counter", "Events that changed a product.", status.APPLIED),
    ("productd_events_stale_total", "counter",
     "Events ignored because their version was not newer than the stored one.", status.STALE),
    ("productd_reads_total", "counter", "Product reads answered by the shard.", status.READS),
    ("productd_products", "gauge", "Products held by the shard.", status.PRODUCTS),
    ("productd_shard_restarts_total", "counter", "Times the supervisor restarted the shard.", status.RESTARTS),
    ("productd_shard_state_lost_total", "counter",
     "Restarts after which the shard's products were gone (memory-only mode).", status.STATE_LOST),
    ("productd_commits_total", "counter", "Transactions the shard committed to its file.", status.COMMITS),
    ("productd_replies_dropped_total", "counter",
     "Replies the shard could not deliver: the asking worker was gone, or its socket was full.",
     status.DROPPED_REPLIES),
    ("productd_inbox_skipped_bytes_total", "counter",
     "Inbox bytes dropped to find a frame boundary after a shard died mid-frame.", status.SKIPPED_BYTES),
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
    for name, kind, help_text, field in SHARD_SERIES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f'{name}{{shard="{s}"}} {board.get(s, field)}' for s in shards)
    lines.append("# HELP productd_inbox_bytes Bytes waiting in the shard's inbox.")
    lines.append("# TYPE productd_inbox_bytes gauge")
    lines.extend(f'productd_inbox_bytes{{shard="{s}"}} {client.inbox_bytes(s)}' for s in shards)
    lines.append("# HELP productd_shard_up 1 while the shard is ready and went round its loop in the last 5 s.")
    lines.append("# TYPE productd_shard_up gauge")
    lines.extend(f'productd_shard_up{{shard="{s}"}} {int(status.answering(board, s))}' for s in shards)
    lines.append("# HELP productd_shard_heartbeat_age_seconds Seconds since the shard last went round its loop.")
    lines.append("# TYPE productd_shard_heartbeat_age_seconds gauge")
    lines.extend(
        f'productd_shard_heartbeat_age_seconds{{shard="{s}"}} {board.heartbeat_age(s):.3f}' for s in shards
    )
    lines.append("# HELP productd_shard_writes_refused 1 while the shard cannot commit and refuses writes.")
    lines.append("# TYPE productd_shard_writes_refused gauge")
    lines.extend(f'productd_shard_writes_refused{{shard="{s}"}} {board.get(s, status.WRITES_REFUSED)}' for s in shards)
    lines.append("# HELP productd_apply_delay_seconds From accepting an event to its shard applying it.")
    lines.append("# TYPE productd_apply_delay_seconds histogram")
    for s in shards:
        cumulative = 0
        for i, bound in enumerate((*status.APPLY_BUCKETS, "+Inf")):
            cumulative += board.get(s, status.APPLY_HIST + i)
            lines.append(f'productd_apply_delay_seconds_bucket{{shard="{s}",le="{bound}"}} {cumulative}')
        lines.append(f'productd_apply_delay_seconds_sum{{shard="{s}"}} {board.get(s, status.APPLY_SUM_US) / 1e6}')
        lines.append(f'productd_apply_delay_seconds_count{{shard="{s}"}} {board.get(s, status.APPLY_COUNT)}')
    lines.extend(stats.render(client.shards))
    return "\n".join(lines) + "\n"
