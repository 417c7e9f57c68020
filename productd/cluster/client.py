"""The front end's handle to the shards in the multi-host mode: publish to the shard queues on
RabbitMQ and await the owners' answers over direct reply-to.

It is a ShardClient (productd.actors.client) to the HTTP side: the same methods, the same
exceptions, so every resource works unchanged. What differs:

- events: one message per shard per request, published persistent on a channel with publisher
  confirms; an item counts as accepted once the broker confirmed its message (a 202 means "in
  the owner's FIFO queue, durably"). With --durability sync the owner also answers after its
  commit to PostgreSQL, and the 202 waits for that. A nack (the queue is at --queue-length) is
  a full inbox: 503 with Retry-After; a lost connection is an unavailable shard: 503 too.
- reads (a product, a multi-get, a listing, the change feed) are messages in the same queue,
  behind the writes, so read-your-writes holds across front ends. Their answer comes over
  direct reply-to, which is at most once: no answer within --read-timeout (the owner is failing
  over) is ShardUnavailable, a 503 with Retry-After, never a stale answer.
- catalogue writes go on the confirmed channel (a full queue is InboxFull, nothing applied);
  no answer in time is ShardTimeout (504: it is in the queue and may still be applied).
- health and metrics come from PostgreSQL (what each shard's active owner reports in its
  heartbeat) and the broker (messages waiting per queue), read by `refresh()`.

One ClusterClient per gunicorn worker; its connection is opened on the worker's loop at the
first request and opened again after the broker went away.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import aio_pika
import psycopg

from productd.actors import protocol
from productd.actors.client import (
    ApplyDelay,
    InboxFull,
    ShardClient,
    ShardCounters,
    ShardHealth,
    ShardTimeout,
    ShardUnavailable,
    Submission,
)
from productd.actors.status import APPLY_BUCKETS
from productd.cluster import broker, pgstore

log = logging.getLogger("productd.cluster")

REPLY_TO = "amq.rabbitmq.reply-to"
REFRESH_EVERY = 1.0  # seconds a health snapshot serves /readyz and /metrics
OWNER_SILENT = 5.0  # seconds without its owner's heartbeat after which a shard counts as not answering
RECONNECT_EVERY = 1.0  # seconds between attempts to reach a broker that went away


class ClusterClient(ShardClient):
    def __init__(
        self,
        settings,
        board,
        late_reply: Callable[[], None] = lambda: None,
    ) -> None:
        # Not ShardClient.__init__: no inboxes here. What the inherited methods use is set below
        # (shard_for, pack, write, read_many and stopping read shards, board and _ids).
        self.settings = settings
        self.shards = settings.shards
        self.board = board  # the local supervisor's: `stopping` comes from it
        self.enqueue_timeout = settings.enqueue_timeout
        self.read_timeout = settings.read_timeout
        self.wait_for_commit = settings.durability == "sync"
        self.late_reply = late_reply
        self.on_supervisor_gone = lambda: None
        self.gone = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._connection = None
        self._confirmed = self._plain = None
        self._connecting: asyncio.Lock | None = None
        self._retry_at = 0.0
        self._status: list[tuple] = []
        self._lag: dict[int, int] = {}
        self._refreshed = 0.0
        self.broker_error = "not connected yet"
        self.database_error = "not checked yet"
        self._db = None

    # ---- the connection

    def _usable(self) -> bool:
        # A broker that stops closes the channels before (or without) the connection: either
        # closed means start again.
        return self._connection is not None and not self._connection.is_closed and \
            not self._confirmed.is_closed and not self._plain.is_closed

    async def _channels(self):
        if self._usable():
            return self._confirmed, self._plain
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._usable():
                return self._confirmed, self._plain
            if self._connection is not None:
                old, self._connection = self._connection, None
                self._on_closed()
                try:
                    await asyncio.wait_for(old.close(), 1.0)
                except Exception:  # it is gone either way
                    pass
            if time.monotonic() < self._retry_at:
                raise ShardUnavailable(-1)
            self._retry_at = time.monotonic() + RECONNECT_EVERY
            try:
                connection = await aio_pika.connect(self.settings.broker, heartbeat=round(self.settings.heartbeat),
                                                    timeout=self.enqueue_timeout + 2)
                confirmed = await connection.channel(publisher_confirms=True, on_return_raises=True)
                plain = await connection.channel(publisher_confirms=False)
                for channel in (confirmed, plain):
                    # Direct reply-to: answers to what a channel publishes come to that channel.
                    queue = await channel.get_queue(REPLY_TO, ensure=False)
                    await queue.consume(self._on_reply, no_ack=True)
            except Exception as exc:
                self.broker_error = f"{type(exc).__name__}: {exc}"
                log.error("cannot reach the broker: %s", self.broker_error)
                raise ShardUnavailable(-1) from None
            self._connection, self._confirmed, self._plain = connection, confirmed, plain
            self.broker_error = ""
            connection.close_callbacks.add(self._on_closed)
            return confirmed, plain

    def _on_closed(self, *args) -> None:
        self.broker_error = "the connection closed"
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ShardUnavailable(-1))

    async def _on_reply(self, message) -> None:
        request_id, payload = protocol.unpack_reply(message.body)
        future = self._waiting.pop(request_id, None)
        if future is None or future.done():
            self.late_reply()
            return
        future.set_result(payload)

    async def _publish(self, channel, shard: int, body: bytes, reply: bool, persistent: bool) -> bool:
        message = aio_pika.Message(
            body, reply_to=REPLY_TO if reply else None,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await channel.default_exchange.publish(
                message, routing_key=broker.queue_name(self.settings.cluster, shard),
                mandatory=channel is self._confirmed, timeout=self.enqueue_timeout,
            )
        except aio_pika.exceptions.DeliveryError:  # nack or returned: the queue is full (or missing)
            return False
        except (TimeoutError, aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError,
                ConnectionError) as exc:  # the broker is away: the next call connects again
            self.broker_error = self.broker_error or f"{type(exc).__name__}: {exc}"
            raise ShardUnavailable(shard) from exc
        return True

    def _expect(self, request_id: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    async def _answer(self, request_id: int, future: asyncio.Future, timeout: float, shard: int):
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ShardTimeout(shard) from None
        except ShardUnavailable:
            raise ShardUnavailable(shard) from None
        finally:
            self._waiting.pop(request_id, None)

    # ---- what the resources call

    def writable(self, shard: int) -> bool:
        return not self.board.stopping

    async def submit(self, per_shard, total: int) -> Submission:
        result = Submission()
        if self.board.stopping:
            result.not_accepted = list(range(total))
            result.unavailable_shards = list(range(self.shards))
            return result
        try:
            confirmed, _ = await self._channels()
        except ShardUnavailable:
            result.not_accepted = list(range(total))
            result.unavailable_shards = sorted(per_shard)
            return result
        accepted_ns = time.time_ns()
        sync = self.wait_for_commit
        await asyncio.gather(*(self._submit_one(confirmed, shard, items, accepted_ns, sync, result)
                               for shard, items in per_shard.items()))
        result.not_accepted.sort()
        return result

    async def _submit_one(self, channel, shard: int, items, accepted_ns: int, sync: bool, result: Submission) -> None:
        indexes = [index for index, _ in items]
        request_id = next(self._ids)
        body = protocol.Events.pack(b"" if sync else None, request_id, accepted_ns, len(items)) + \
            b"".join(packed for _, packed in items)
        future = self._expect(request_id) if sync else None
        try:
            taken = await self._publish(channel, shard, body, reply=sync, persistent=True)
        except ShardUnavailable:
            self._waiting.pop(request_id, None)
            result.unavailable_shards.append(shard)
            result.not_accepted.extend(indexes)
            return
        if not taken:
            self._waiting.pop(request_id, None)
            result.full_shards.append(shard)
            result.not_accepted.extend(indexes)
            return
        if sync:
            try:
                error = await self._answer(request_id, future, self.read_timeout, shard)
            except (ShardTimeout, ShardUnavailable):
                result.not_accepted.extend(indexes)
                result.uncommitted = True
                return
            if error is not None:
                result.not_accepted.extend(indexes)
                result.commit_errors.append(error)
                return
        result.accepted += len(indexes)

    async def read(self, product_id: str) -> bytes | None:
        shard = self.shard_for(product_id)
        payload = await self.ask(shard, lambda address, request_id: protocol.Get.pack(address, request_id, product_id))
        return payload

    async def ask(self, shard: int, pack, *, write: bool = False, timeout: float | None = None) -> object:
        if self.board.stopping:
            raise ShardUnavailable(shard)
        confirmed, plain = await self._channels()
        request_id = next(self._ids)
        future = self._expect(request_id)
        try:
            # A write must learn whether the queue took it (a nack: full, nothing applied); a read
            # needs no confirm: its answer says it arrived.
            if not await self._publish(confirmed if write else plain, shard, pack(b"", request_id),
                                       reply=True, persistent=write):
                raise InboxFull(shard)
        except BaseException:
            self._waiting.pop(request_id, None)
            raise
        try:
            payload = await self._answer(request_id, future, self.read_timeout if timeout is None else timeout, shard)
        except ShardTimeout:
            if write:
                raise
            # No answer: the owner is failing over (or gone). Never a stale answer: try again.
            raise ShardUnavailable(shard) from None
        if payload == protocol.UNAVAILABLE:
            raise ShardUnavailable(shard)
        return payload

    def supervisor_alive(self) -> bool:
        return True  # the local supervisor only watches this host's processes; the shards are elsewhere

    def inbox_bytes(self, shard: int) -> int:
        return 0

    # ---- health and metrics, from PostgreSQL and the broker

    cluster = True

    async def refresh(self) -> None:
        """Read the shards' owners and queue depths, at most once per REFRESH_EVERY."""
        now = time.monotonic()
        if now - self._refreshed < REFRESH_EVERY:
            return
        self._refreshed = now
        try:
            self._status = await asyncio.to_thread(self._read_status)
            self.database_error = ""
        except psycopg.Error as exc:
            self.database_error = str(exc).strip() or type(exc).__name__
            self._status = []
            self._db = None
        try:
            _, plain = await self._channels()
            for shard in range(self.shards):
                queue = await plain.declare_queue(broker.queue_name(self.settings.cluster, shard), passive=True)
                self._lag[shard] = queue.declaration_result.message_count
        except (TimeoutError, ShardUnavailable, aio_pika.exceptions.AMQPError,
                aio_pika.exceptions.ChannelInvalidStateError) as exc:
            self.broker_error = self.broker_error or f"{type(exc).__name__}: {exc}"
            self._lag = {}

    def _read_status(self) -> list[tuple]:
        if self._db is None or self._db.conn.closed:
            self._db = pgstore.PgStore(psycopg.connect(self.settings.database, autocommit=True, connect_timeout=3))
        return self._db.status()

    def _row(self, shard: int) -> tuple:
        if shard < len(self._status):
            return self._status[shard]
        return (shard, 0, None, None, 0, 0, 0, 0.0)

    def shard_health(self, shard: int) -> ShardHealth:
        _, epoch, owner, seen_age, products, *_ = self._row(shard)
        answering = bool(owner) and seen_age is not None and seen_age < OWNER_SILENT and not self.broker_error
        return ShardHealth(
            state="ready" if answering else "unowned", alive=answering, answering=answering,
            writes_refused=False, pid=0, dozing=False, restarts=0, state_lost=0, products=products or 0,
            inbox_bytes=0, heartbeat_age=seen_age if seen_age is not None else -1.0,
        )

    def owner_row(self, shard: int) -> dict:
        """/readyz's row of one shard: who owns it, since which epoch, and what waits in its queue."""
        _, epoch, owner, seen_age, products, batches, records, seconds = self._row(shard)
        return {"shard": shard, "owner": owner, "epoch": epoch,
                "seen_age": None if seen_age is None else round(seen_age, 3),
                "queue_messages": self._lag.get(shard), "products": products,
                "batches": batches, "batch_records": records, "commit_seconds": round(seconds or 0.0, 6)}

    def cluster_status(self) -> dict:
        return {
            "cluster": self.settings.cluster,
            "broker": self.broker_error or "ok",
            "database": self.database_error or "ok",
            "owners": [self.owner_row(shard) for shard in range(self.shards)],
        }

    def shard_counters(self, shard: int) -> ShardCounters:
        return ShardCounters(0, 0, 0, 0, self._row(shard)[5] or 0, 0, 0, 0)

    def apply_delay(self, shard: int) -> ApplyDelay:
        return ApplyDelay([(str(bound), 0) for bound in (*APPLY_BUCKETS, "+Inf")], 0.0, 0)
