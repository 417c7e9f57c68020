"""GET /changes: the change feed, as Server-Sent Events (docs/feed.md).

Each shard numbers the changes it applies (productd.store.changes); a subscriber's cursor
(productd.http.feed_cursor) is where it is in every shard's history. The stream keeps one
protocol.Changes request in flight per shard: the shard answers with what came after the
subscriber's position there, or parks the request until something does (an idle subscriber
costs nothing but the parked entry). Answers are emitted as they come, each change one event
whose id is the cursor right after it; per-product order holds because a product's changes all
come from its one shard, in order.

Nothing is buffered without bound: one answer (at most `limit` changes) per shard is in hand at
a time, and a subscriber whose lag behind a shard's head passes `max_lag` (or whose writes
stall for STALL seconds) gets a last `cut-off` event naming the cursor to resume from.
"""

from __future__ import annotations

import asyncio
import time

import falcon
import orjson

from productd.actors import protocol
from productd.actors.client import InboxFull, ShardClient, ShardTimeout, ShardUnavailable
from productd.http import feed_cursor, validation
from productd.http.problems import Problem
from productd.http.render import product_json
from productd.store.changes import EXPIRED, OK
from productd.store.reshard_history import FOREIGN

HEARTBEAT = 15.0  # seconds between comments on an idle stream (proxies close silent ones)
PARK = 15.0  # seconds a shard keeps an empty request parked before answering it empty
LIMIT = 1000  # changes per answer
MAX_IDS = 1000  # ids in the `ids` filter
STALL = 30.0  # seconds one write to the subscriber may take before it is cut off
RETRY = 0.5  # seconds before asking a shard that was unavailable again
STOPPING_CHECK = 1.0  # seconds between looks at whether the service is stopping
CUT_OFF_EXPIRED = "expired"
RESYNC = ("list the products with GET /products (its answer has `changes_cursor`), then follow "
          "GET /changes?since=<that cursor>")


class _Chunk:
    """Serialized events, sent as one body part (falcon calls serialize() on what the stream yields)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self, handler=None) -> bytes:
        return self.data


def _event(cursor: str, kind: bytes, data: dict) -> bytes:
    return b"id: " + cursor.encode() + b"\nevent: " + kind + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ChangeFeed:
    def __init__(self, client: ShardClient, change_history: int, max_lag: int | None = None) -> None:
        self.client = client
        self.max_lag = max_lag if max_lag is not None else max(1, change_history // 2)

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        client = self.client
        shards = client.shards
        cursor = req.get_header("Last-Event-ID") or req.get_param("since")
        user_id = req.get_param("user_id")
        if user_id is not None and not validation.valid_product_id(user_id):
            raise Problem(400, "Bad user_id", f"user_id must be {validation.PRODUCT_ID_RULE}", kind="bad-filter")
        per_shard: list[tuple[str, ...] | None] = [None] * shards
        asked = list(range(shards))
        text = req.get_param("ids")
        if text is not None:
            ids = list(dict.fromkeys(part for part in text.split(",") if part))
            bad = [i for i in ids if not validation.valid_product_id(i)]
            if not ids or bad or len(ids) > MAX_IDS:
                raise Problem(400, "Bad ids", f"ids must be 1 to {MAX_IDS} comma-separated product ids, each "
                              f"{validation.PRODUCT_ID_RULE}", kind="bad-filter")
            grouped: dict[int, list[str]] = {}
            for product_id in ids:
                grouped.setdefault(client.shard_for(product_id), []).append(product_id)
            per_shard = [tuple(grouped[s]) if s in grouped else None for s in range(shards)]
            asked = sorted(grouped)  # a shard that owns none of the ids is not asked at all
        heads: list[int] | None = None
        if cursor:
            try:
                heads = feed_cursor.decode(cursor)
            except feed_cursor.BadCursor as exc:
                raise Problem(400, "Bad cursor", f"{exc}; {RESYNC}", kind="bad-cursor") from None
        # A cursor of another shard count is from before a reshard: every shard translates it
        # (productd.store.reshard_history) and answers where it starts for it. Without a cursor
        # every shard is asked for its head; with one, only the shards the filter needs.
        old = heads is not None and len(heads) != shards
        initial = asked if heads is not None and not old else list(range(shards))
        first = await _shard_errors(asyncio.gather(*(
            self._ask(s, None if heads is None else heads if old else heads[s], user_id, per_shard[s], 0.0)
            for s in initial
        )))
        for s, answer in zip(initial, first, strict=True):
            status = answer[0]
            if status == FOREIGN:
                raise Problem(400, "Bad cursor", f"the cursor is for {len(heads)} shards and the service has "
                              f"{shards}, not resharded from {len(heads)}; {RESYNC}", kind="bad-cursor")
            if status != OK:
                at = "the cursor's position" if old else f"the cursor is at {heads[s]}"
                why = (f"shard {s} keeps changes after {answer[2]} only; {at}" if status == EXPIRED else
                       f"shard {s} restarted without the changes the cursor has seen ({at}, head {answer[1]})")
                raise Problem(410, "Cursor too old", f"{why}: {RESYNC}", kind="cursor-expired",
                              resync="/products")
        answers = dict(zip(initial, first, strict=True))
        if heads is None:
            positions = [answers[s][1] for s in range(shards)]
        elif old:
            # Where each shard starts for it: before its first change for this stream, or where it
            # looked up to when nothing there is wanted.
            positions = [answers[s][4][0][0] - 1 if answers[s][4] else answers[s][3] for s in range(shards)]
        else:
            positions = list(heads)
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("X-Accel-Buffering", "no")
        first_answers = {s: answers[s] for s in asked} if heads is not None else {}
        resp.sse = self._stream(positions, asked, first_answers, user_id, per_shard)

    async def _ask(self, shard: int, after: int | None, user_id, ids, wait: float):
        client = self.client
        return await client.ask(
            shard, lambda a, r: protocol.Changes.pack(a, r, after, user_id, ids, LIMIT, wait),
            timeout=wait + client.read_timeout,
        )

    async def _stream(self, pos: list[int], asked: list[int], first: dict, user_id, per_shard):
        loop = asyncio.get_running_loop()
        tasks: dict[asyncio.Task, int] = {}
        max_lag = self.max_lag

        def ask(shard: int, delay: float = 0.0) -> None:
            async def run():
                if delay:
                    await asyncio.sleep(delay)
                return await self._ask(shard, pos[shard], user_id, per_shard[shard], PARK)
            tasks[asyncio.ensure_future(run())] = shard

        try:
            answers = list(first.items())
            for shard in asked:
                if shard not in first:
                    ask(shard)
            next_beat = loop.time() + HEARTBEAT
            while True:
                out = []
                for shard, answer in answers:
                    status, head, _oldest, scanned_to, items = answer
                    if status == EXPIRED:
                        yield _Chunk(self._cut_off(pos, "slow", f"this stream fell out of shard {shard}'s history "
                                                   f"(it keeps changes after {_oldest} only): {RESYNC}"))
                        return
                    if status != OK:
                        yield _Chunk(self._cut_off(pos, "history-lost", f"shard {shard} lost changes this stream "
                                                   f"may have shown (it restarted): {RESYNC}"))
                        return
                    for seq, product_id, packed in items:
                        pos[shard] = seq
                        cursor = feed_cursor.encode(pos)
                        if packed is None:
                            out.append(_event(cursor, b"delete", {"product_id": product_id, "deleted": True}))
                        else:
                            out.append(_event(cursor, b"change", product_json(product_id, packed)))
                    if scanned_to > pos[shard]:
                        pos[shard] = scanned_to
                    if head - pos[shard] > max_lag:
                        if out:
                            yield _Chunk(b"".join(out))
                        yield _Chunk(self._cut_off(pos, "slow", f"this stream is {head - pos[shard]} changes "
                                                   f"behind shard {shard} (more than {max_lag}); resume from "
                                                   "the cursor, soon enough to stay within the history"))
                        return
                    ask(shard)
                if out:
                    started = time.monotonic()
                    yield _Chunk(b"".join(out))
                    next_beat = loop.time() + HEARTBEAT
                    if time.monotonic() - started > STALL:
                        yield _Chunk(self._cut_off(pos, "stalled", f"a write to this stream took more than "
                                                   f"{STALL:.0f}s; resume from the cursor"))
                        return
                answers = []
                if self.client.stopping:  # end the stream, or it holds the stop for --graceful-timeout
                    yield _Chunk(self._cut_off(pos, "stopping", "the service is stopping; resume from the "
                                               "cursor once it is back"))
                    return
                timeout = next_beat - loop.time()
                done = set()
                if timeout > 0:
                    done, _ = await asyncio.wait(tasks, timeout=min(timeout, STOPPING_CHECK),
                                                 return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if loop.time() >= next_beat:
                        yield None  # falcon sends an empty event: a ": ping" comment
                        next_beat = loop.time() + HEARTBEAT
                    continue
                for task in done:
                    shard = tasks.pop(task)
                    try:
                        answers.append((shard, task.result()))
                    except (ShardUnavailable, InboxFull):  # restarting, stopping, full: ask again soon
                        ask(shard, RETRY)
                    except ShardTimeout:
                        ask(shard)
                answers.sort()
        finally:
            for task in tasks:
                task.cancel()

    @staticmethod
    def _cut_off(pos: list[int], reason: str, detail: str) -> bytes:
        cursor = feed_cursor.encode(pos)
        return _event(cursor, b"cut-off", {"cursor": cursor, "reason": reason, "detail": detail})


async def _shard_errors(awaitable):
    try:
        return await awaitable
    except InboxFull as exc:
        raise Problem(503, "Shard busy", f"shard {exc.args[0]}'s inbox is full; try again",
                      headers={"Retry-After": "1"}) from None
    except ShardUnavailable as exc:
        raise Problem(503, "Shard unavailable", f"shard {exc.args[0] if exc.args else '?'} is restarting or the "
                      "service is stopping; try again", headers={"Retry-After": "1"}) from None
    except ShardTimeout as exc:
        raise Problem(504, "Shard timeout", f"shard {exc.args[0]} did not answer in time") from None

