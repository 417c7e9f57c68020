"""Falcon ASGI resources: events in, and the health of the service (products: catalogue.py)."""

from __future__ import annotations

import asyncio

import falcon
import orjson

from productd.actors.client import ShardClient
from productd.http import validation
from productd.http.connection import BODY_CUT
from productd.http.problems import Problem
from productd.http.stats import HttpStats

JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")
RETRY_AFTER_FULL = "1"
# Bodies at least this big are parsed, validated and packed in a thread: on the loop they would
# stall every other connection of the worker (10,000 events: tens of ms). Smaller ones stay on
# the loop: measured with 1,000-event bodies, a thread each halved bulk throughput (277 against
# 568 requests/s), the hand-over and the GIL costing more than the ~2 ms of work.
OFFLOAD_BYTES = 256 * 1024


_EXACT_TYPES = {
    "application/json": validation.events_from_json,
    "application/x-ndjson": validation.events_from_ndjson,
}


class Events:
    def __init__(self, client: ShardClient, stats: HttpStats, max_body_bytes: int, max_events: int) -> None:
        self.client = client
        self.stats = stats
        self.max_body_bytes = max_body_bytes
        self.max_events = max_events

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        parse = self._parser(req.content_type)
        body = await read_body(req, self.max_body_bytes)
        if len(body) >= OFFLOAD_BYTES:
            events, per_shard = await asyncio.to_thread(self._prepare, parse, body)
        else:
            events, per_shard = self._prepare(parse, body)
        result = await self.client.submit(per_shard, len(events))
        if result.not_accepted:
            shard_for = self.client.shard_for
            for index in result.not_accepted:
                self.stats.rejected(shard_for(events[index][0]), 1)
            raise self._refused(result, len(events))
        resp.status = falcon.HTTP_202
        resp.data = orjson.dumps({"accepted": result.accepted})

    def _prepare(self, parse, body: bytes):
        events = parse(body, self.max_events)
        return events, self.client.pack(events)

    def _parser(self, content_type: str | None):
        exact = _EXACT_TYPES.get(content_type)  # the usual headers, without parsing them
        if exact is not None:
            return exact
        media, _, params = (content_type or "").partition(";")
        media = media.strip().lower()
        charset = ""
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset":
                charset = value.strip().strip('"').lower()
        if charset and charset not in ("utf-8", "utf8"):
            raise Problem(415, "Unsupported charset", f"charset {charset!r} is not supported; send UTF-8")
        if media in JSON_TYPES:
            return validation.events_from_json
        if media in NDJSON_TYPES:
            return validation.events_from_ndjson
        shown = f"Content-Type {media!r}" if media else "no Content-Type"
        raise Problem(
            415, "Unsupported media type",
            f"{shown}; send application/json (an event or an array of events) "
            "or application/x-ndjson (one event per line)",
            headers={"Accept-Post": "application/json, application/x-ndjson"},
        )

    def _refused(self, result, total: int) -> Problem:
        reasons = []
        if self.client.stopping:
            reasons.append("the service is stopping")
        else:
            if result.unavailable_shards:
                reasons.append(
                    f"shard(s) {sorted(set(result.unavailable_shards))} are restarting or cannot commit to disk"
                )
            if result.full_shards:
                reasons.append(f"the inbox of shard(s) {sorted(set(result.full_shards))} is full")
            if result.commit_errors:
                reasons.append(f"a commit failed ({result.commit_errors[0]})")
            if result.uncommitted:
                reasons.append(f"no commit was confirmed within {self.client.read_timeout}s")
        return Problem(
            503, "Events not accepted",
            f"{len(result.not_accepted)} of {total} events were not queued because "
            f"{' and '.join(reasons)}; resend only the items listed in not_accepted",
            kind="events-not-accepted",
            headers={"Retry-After": RETRY_AFTER_FULL},
            accepted=result.accepted,
            not_accepted=result.not_accepted,
        )


async def read_body(req: falcon.Request, limit: int) -> bytes:
    """The whole request body, at most `limit` bytes: 413 past it, 400 for none or one cut short."""
    length = req.content_length
    if length is not None and length > limit:
        # Refused on the header alone, before a byte is read (and before any 100 Continue).
        # The rest of the body is read and discarded by the connection (productd.http.connection).
        # A client that waits for 100 Continue sends no body: the connection cannot go on.
        raise _too_large(length, limit, {"Connection": "close"} if req.expect else None)
    # The stream ends where the body ends, with Content-Length or chunked (which the server
    # decodes): one byte more than the limit tells a body that is too large, and no more than
    # that is ever held.
    body = await req.stream.read(limit + 1 if length is None else length)
    cut = req.scope.get(BODY_CUT)
    if cut is not None:  # the stream ended early: a closed connection or the body deadline
        status, detail = cut
        raise Problem(status, "Incomplete body" if status == 400 else "Body timeout", detail,
                      kind="incomplete-body" if status == 400 else "request-timeout",
                      headers={"Connection": "close"})
    if len(body) > limit:
        raise _too_large(None, limit)
    if not body:
        raise Problem(400, "Empty body", "the request has no body")
    return body


def _too_large(length: int | None, limit: int, headers: dict[str, str] | None = None) -> Problem:
    size = f"{length} bytes" if length is not None else "more than that"
    return Problem(
        413, "Body too large",
        f"the body is {size}; at most {limit} bytes are taken (--max-body-bytes)",
        kind="body-too-large",
        headers=headers,
    )


class Health:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = b'{"status":"ok"}'

    on_head = on_get


async def image_workers(pool, job_file) -> list[dict]:
    """A row per image worker: its pid, state and restarts from the pool board, and the job it
    holds from the job file (cached; null when idle or unknown)."""
    from productd.actors import pool as row

    stats = await job_file.stats() if job_file is not None else None
    running = stats["running"] if stats else {}
    workers = []
    for worker in range(pool.workers):
        name = f"image-worker-{worker}"
        workers.append({
            "id": worker, "name": name, "pid": pool.get(worker, row.PID), "state": pool.state_name(worker),
            "restarts": pool.get(worker, row.RESTARTS), "job": running.get(name),
        })
    return workers


class Ready:
    def __init__(self, client: ShardClient, pool=None, job_file=None) -> None:
        self.client = client
        self.pool = pool  # productd.actors.pool.PoolBoard
        self.job_file = job_file  # productd.http.image_jobs.JobFile

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """503 when a shard is not answering or the service stops; 200 "degraded" when every shard
        answers but one or more refuse writes (reads are still served, so a load balancer should
        keep the instance for reads; the writes get 503 with Retry-After on their own)."""
        client = self.client
        await client.refresh()
        shards = []
        ready = not client.stopping
        degraded = False
        for shard in range(client.shards):
            health = client.shard_health(shard)
            ready = ready and health.answering
            degraded = degraded or health.writes_refused
            shards.append(
                {
                    "id": shard,
                    "pid": health.pid,
                    "state": health.state,
                    "alive": health.alive,
                    "ready": health.answering,
                    "writes_refused": health.writes_refused,
                    "inbox_bytes": health.inbox_bytes,
                    "dozing": health.dozing,
                    "restarts": health.restarts,
                    "state_lost": health.state_lost,
                    "products": health.products,
                }
            )
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        overall = "not_ready" if not ready else "degraded" if degraded else "ready"
        body = {"status": overall, "shards": shards}
        if client.cluster:
            status = client.cluster_status()
            body["cluster"] = status
            # Without the broker nothing reaches a shard: not ready. Without the database the
            # owners cannot commit, but the queues still take events and the owners still answer
            # reads from memory: degraded, as a shard that cannot commit on one host.
            if status["broker"] != "ok":
                resp.status = falcon.HTTP_503
                body["status"] = "not_ready"
            elif status["database"] != "ok" and body["status"] == "ready":
                body["status"] = "degraded"
        if self.pool is not None:
            # The pool does not decide readiness: without it the service serves every request,
            # and images wait (their jobs are durable).
            body["image_workers"] = await image_workers(self.pool, self.job_file)
        resp.data = orjson.dumps(body)

    on_head = on_get
