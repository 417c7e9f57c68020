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
    ("productd_image_results_dropped_total", "counter",
     "Image results the shard dropped: the product is gone or no longer shows the image.",
     lambda h, c: c.image_results_dropped),
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
    def __init__(self, client: ShardClient, stats: HttpStats, pool=None, job_file=None) -> None:
        self.client = client
        self.stats = stats
        self.pool = pool  # productd.actors.pool.PoolBoard
        self.job_file = job_file  # productd.http.image_jobs.JobFile

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE
        await self.client.refresh()
        text = render(self.client, self.stats)
        if self.client.cluster:
            text += "\n".join(render_cluster(self.client)) + "\n"
        if self.pool is not None:
            job_stats = await self.job_file.stats() if self.job_file is not None else None
            text += "\n".join(render_images(self.pool, job_stats)) + "\n"
        resp.text = text

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


# The multi-host mode (docs/cluster.md, "Metrics"): what each shard's active owner reports to
# PostgreSQL in its heartbeat, and what waits in its queue. The per-shard series above are this
# front end's view (up, products, heartbeat age); the owners' own counters are here.
CLUSTER_SERIES = (
    ("productd_cluster_queue_messages", "gauge", "Messages waiting in the shard's queue (consumer lag).",
     lambda row: row["queue_messages"]),
    ("productd_cluster_shard_epoch", "gauge", "The shard's fencing epoch: +1 at every take by an owner.",
     lambda row: row["epoch"]),
    ("productd_cluster_batches_total", "counter", "Batches the shard's owners saved to PostgreSQL.",
     lambda row: row["batches"]),
    ("productd_cluster_batch_records_total", "counter", "Products written by those batches.",
     lambda row: row["batch_records"]),
    ("productd_cluster_commit_seconds_total", "counter", "Seconds the shard's owners spent saving batches.",
     lambda row: row["commit_seconds"]),
)


def render_cluster(client) -> list[str]:
    status = client.cluster_status()
    rows = status["owners"]
    lines = [
        "# HELP productd_cluster_broker_up 1 while this front end reaches the broker.",
        "# TYPE productd_cluster_broker_up gauge",
        f"productd_cluster_broker_up {int(status['broker'] == 'ok')}",
        "# HELP productd_cluster_database_up 1 while this front end reaches the database.",
        "# TYPE productd_cluster_database_up gauge",
        f"productd_cluster_database_up {int(status['database'] == 'ok')}",
        "# HELP productd_cluster_shard_owner The shard's active owner (host:pid/shard), as an info series.",
        "# TYPE productd_cluster_shard_owner gauge",
        *(f'productd_cluster_shard_owner{{shard="{row["shard"]}",owner="{row["owner"] or ""}"}} 1' for row in rows),
    ]
    for name, kind, help_text, value in CLUSTER_SERIES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{shard="{row["shard"]}"}} {value(row) if value(row) is not None else "NaN"}'
                  for row in rows]
    return lines


# The image pipeline (docs/images.md, "Metrics"): the pool's counters from its board (each
# worker counts its own), the queue from the job file (cached for a second, image_jobs.JobFile).
POOL_COUNTERS = (
    ("productd_image_downloads_total", "DOWNLOADS", "Image downloads that fetched a whole body."),
    ("productd_image_download_failures_total", "DOWNLOAD_FAILURES", "Image downloads that failed, for any reason."),
    ("productd_image_retries_total", "RETRIES",
     "Failed image attempts that were transient (timeouts, connection errors, 5xx, 429): retried while attempts "
     "are left."),
    ("productd_image_compressions_total", "COMPRESSIONS", "Renditions made and stored."),
    ("productd_image_compression_failures_total", "COMPRESSION_FAILURES",
     "Downloaded bodies refused by the renderer (not an image, too many pixels)."),
    ("productd_image_dead_lettered_total", "DEAD_LETTERED", "Image jobs that went to the dead-letter queue."),
    ("productd_image_bytes_in_total", "BYTES_IN", "Bytes of images downloaded."),
    ("productd_image_bytes_out_total", "BYTES_OUT", "Bytes of renditions stored."),
)


def render_images(pool, job_stats: dict | None) -> list[str]:
    from productd.actors import pool as row

    lines = [
        "# HELP productd_image_workers Image worker processes configured (--image-workers).",
        "# TYPE productd_image_workers gauge",
        f"productd_image_workers {pool.workers}",
        "# HELP productd_image_worker_up 1 while the image worker process runs.",
        "# TYPE productd_image_worker_up gauge",
        *(f'productd_image_worker_up{{worker="{w}"}} {int(pool.get(w, row.STATE) == row.READY)}'
          for w in range(pool.workers)),
        "# HELP productd_image_worker_restarts_total Times the supervisor restarted the image worker.",
        "# TYPE productd_image_worker_restarts_total counter",
        *(f'productd_image_worker_restarts_total{{worker="{w}"}} {pool.get(w, row.RESTARTS)}'
          for w in range(pool.workers)),
    ]
    for name, field, help_text in POOL_COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {pool.total(getattr(row, field))}"]
    for name, hist, sum_us, help_text in (
        ("productd_image_download_seconds", row.DOWNLOAD_HIST, row.DOWNLOAD_SUM_US,
         "Time to download an image, redirects included (successful downloads)."),
        ("productd_image_compression_seconds", row.COMPRESSION_HIST, row.COMPRESSION_SUM_US,
         "Time to check, decode, resize, encode and store a rendition."),
    ):
        buckets, total, count = pool.histogram(hist, sum_us)
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{bound}"}} {cumulative}' for bound, cumulative in buckets]
        lines += [f"{name}_sum {total}", f"{name}_count {count}"]
    lines += ["# HELP productd_image_jobs_readable 1 when the front end could read the image job file.",
              "# TYPE productd_image_jobs_readable gauge",
              f"productd_image_jobs_readable {int(job_stats is not None)}"]
    if job_stats is not None:
        lines += ["# HELP productd_image_jobs Image jobs by state (queued, running, done, failed: waiting to be "
                  "retried, dead).", "# TYPE productd_image_jobs gauge"]
        lines += [f'productd_image_jobs{{state="{state}"}} {n}' for state, n in job_stats["counts"].items()]
        lines += ["# HELP productd_image_queue_age_seconds How long the longest-waiting due image job has waited.",
                  "# TYPE productd_image_queue_age_seconds gauge",
                  f"productd_image_queue_age_seconds {job_stats['oldest_due_age']:.3f}"]
    return lines
