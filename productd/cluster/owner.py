"""A shard owner of the multi-host mode: the same actor as productd.actors.shard, fed by its
shard's queue on RabbitMQ, keeping its products in PostgreSQL.

Every owner host runs one such process per shard of the cluster (the supervisor forks them as
it forks shards on one host). Each subscribes to its shard's queue; the queue has a single
active consumer, so one process in the whole cluster gets the shard's messages and the others
wait. The active one:

1. learns it is active from its first delivery (a queue with nothing in it delivers nothing:
   a waiting process publishes a `Ping` now and then, which whoever is active reads);
2. takes the shard: increments its epoch in PostgreSQL (`PgStore.take`, the fencing token),
   loads its products and goes on numbering changes from the last saved one (plus a gap, as a
   durable shard does at a restart: a number the last owner handed out but did not save is
   never reused);
3. applies each batch of messages in order with the shard's own handlers, saves what changed
   if its epoch is still the shard's (`PgStore.save`), and only then acknowledges the batch.
   Messages never acknowledged go back to the queue, ahead of newer ones, for the next owner.

An owner that finds its epoch gone (`Fenced`: it was paused or cut off, and another took the
shard) or loses its broker connection exits at once, dropping its state; the supervisor starts
it again as a waiting subscriber. Replies go over direct reply-to (the `reply_to` of the
message); the front end waits for them until --read-timeout.

Spreading. RabbitMQ 3.10 gives a queue to its first subscriber. Owner host I of H
(--owner-index, --owner-hosts) prefers the shards k with k % H == I: it subscribes to those at
once and to the others after STANDBY_DELAY, so hosts that start together each get their share.
A host that starts later says in PostgreSQL that it waits for its shards (`PgStore.wait_for`);
the active owner of such a shard that is not its preferred host sees that in its heartbeat and
hands the shard over (commit, acknowledge, close its channel, subscribe again at the back).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import aio_pika
import msgpack
import psycopg

from productd.actors import protocol, status
from productd.actors.shard import IDLE_TICK, VOID_GAP, Shard
from productd.cluster import broker, pgstore

log = logging.getLogger("productd.owner")

# Exit codes of an owner process; the supervisor starts it again (after a growing delay when it
# keeps exiting), as a waiting subscriber.
EXIT_FENCED = 76  # another owner took the shard
EXIT_UNREACHABLE = 77  # the broker connection is gone (the broker gave the shard to another), or the
#                        broker or the database did not answer at the process's start
STANDBY_DELAY = 3.0  # seconds before a host subscribes to the shards it does not prefer
PING_EVERY = 1.0  # seconds between the Pings of a waiting subscriber
BEAT_EVERY = 1.0  # seconds between the active owner's heartbeats in PostgreSQL
PREFERRED_WAIT = 3 * BEAT_EVERY  # a preferred host's wait is fresh for this long
RETRY_COMMIT = 1.0
# Kinds whose header carries a reply address at [1]; the owner puts the message's reply_to there.
_REPLY_KINDS = frozenset((protocol.EVENTS, protocol.GET, protocol.WRITE, protocol.GET_MANY, protocol.LIST,
                          protocol.CHANGES))
_packb = msgpack.Packer(use_bin_type=True).pack


def owner_name(shard: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}/{shard}"


def prefers(shard: int, index: int, hosts: int) -> bool:
    return shard % hosts == index


def with_reply_to(body: bytes, reply_to: str | None) -> bytes:
    """The body with the message's reply_to as its header's reply address. A front end puts b""
    there when it wants an answer (None when not: an event in batch mode); the address only the
    broker knows (direct reply-to) replaces it."""
    if not reply_to:
        return body
    unpacker = msgpack.Unpacker(use_list=False, raw=False)
    unpacker.feed(body)
    head = unpacker.unpack()
    if head[0] not in _REPLY_KINDS or head[1] is None:
        return body
    return _packb((head[0], reply_to.encode(), *head[2:])) + body[unpacker.tell():]


class ClusterShard(Shard):
    """One shard's owner process on one owner host: waiting, or the shard's active owner."""

    def __init__(self, shard_id: int, inbox_fd: int, board, settings, *, images=None) -> None:
        super().__init__(shard_id, inbox_fd, board, durability="none", change_history=settings.change_history,
                         images=images, stop_timeout=settings.graceful_timeout)
        self.replies.close()  # answers go over the broker
        self.settings = settings
        self.durability = settings.durability  # sync: catalogue writes and events are answered after the commit
        self.memory_only = False  # what is applied stays dirty until PostgreSQL has it
        self.name = owner_name(shard_id)
        self.preferred = prefers(shard_id, settings.owner_index, settings.owner_hosts)
        self.epoch: int | None = None  # set once this process is the shard's active owner
        self.db: pgstore.PgStore | None = None
        self.consumer: broker.Consumer | None = None
        self.handled: aio_pika.abc.AbstractIncomingMessage | None = None  # the last message applied
        self.outgoing: list[tuple[str, bytes]] = []  # replies to publish after this turn
        self.stop_requested = False
        self.lost = ""  # why this process must exit (broker gone)
        self.commit_seconds = 0.0  # since the last heartbeat
        self.forward: list[bytes] = []  # image results from this host's workers, for the active owner

    # ---- the process

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        s, sid, board = self.settings, self.id, self.board
        board.beat(sid)
        try:
            self.db = pgstore.PgStore(await asyncio.to_thread(_connect, s.database))
        except psycopg.Error as exc:
            log.error("shard %d: cannot reach the database: %s", sid, str(exc).strip())
            return EXIT_UNREACHABLE
        try:
            connection = await aio_pika.connect(s.broker, heartbeat=round(s.heartbeat), timeout=10)
            self.reply_channel = await connection.channel(publisher_confirms=False)
            self.forward_channel = await connection.channel(publisher_confirms=True)
        except Exception as exc:  # refused, reset, a timeout: the broker is away; wait and try again
            log.error("shard %d: cannot reach the broker: %s: %s", sid, type(exc).__name__, exc)
            return EXIT_UNREACHABLE
        connection.close_callbacks.add(self._on_connection_closed)
        self._open_jobs()
        loop = asyncio.get_running_loop()
        os.set_blocking(self.inbox_fd, False)
        loop.add_reader(self.inbox_fd, self._on_inbox)
        board.set(sid, status.STATE, status.READY)  # ready to serve whenever the broker hands it the shard
        if not self.preferred:
            await self._sleep(STANDBY_DELAY)
        try:
            await self._subscribe(connection)
            code = await self._serve(connection)
        except pgstore.Fenced as exc:
            log.error("shard %d: %s; this owner drops its state and waits for the shard again", sid, exc)
            return EXIT_FENCED
        except (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, ConnectionError) as exc:
            # the broker went away in the middle of a call
            log.error("shard %d: the broker connection failed (%s: %s); this owner drops its state", sid,
                      type(exc).__name__, exc)
            return EXIT_UNREACHABLE
        finally:
            loop.remove_reader(self.inbox_fd)
        if not connection.is_closed:
            await connection.close()
        return code

    async def _subscribe(self, connection) -> None:
        s = self.settings
        self.consumer = await broker.Consumer.open(connection, s.cluster, self.id, s.queue_length, s.prefetch)
        log.info("shard %d: subscribed to %s as %s%s", self.id, broker.queue_name(s.cluster, self.id), self.name,
                 " (its preferred host)" if self.preferred else "")

    async def _serve(self, connection) -> int:
        sid, board = self.id, self.board
        next_ping = next_beat = 0.0
        while True:
            board.beat(sid)
            if self.lost:
                log.error("shard %d: %s; this owner drops its state", sid, self.lost)
                return EXIT_UNREACHABLE
            if self.stop_requested:
                return await self._finish()
            now = time.monotonic()
            if self.epoch is None and now >= next_ping:
                await self._ping()
                next_ping = now + PING_EVERY
            if now >= next_beat:
                next_beat = now + BEAT_EVERY
                if await self._beat():
                    await self._hand_over(connection)
                    continue
            if self.forward:
                await self._forward_results()
            wait = IDLE_TICK if not self.dirty else max(0.0, self.next_commit - time.monotonic())
            messages = await self.consumer.batch(self.settings.prefetch, timeout=min(wait, PING_EVERY))
            if messages:
                if self.epoch is None:
                    await self._take()
                self.handle([with_reply_to(m.body, m.reply_to) for m in messages])
                self.handled = messages[-1]
            if self.epoch is not None:
                if self.pending_acks or (self.dirty and time.monotonic() >= self.next_commit) or \
                        (self.handled is not None and not self.dirty):
                    await self._commit()
                self._feed_turn()
            await self._send_replies()

    # ---- taking, committing, handing over

    async def _take(self) -> None:
        sid, db = self.id, self.db
        started = time.monotonic()
        self.epoch = await asyncio.to_thread(db.take, sid, self.name)
        count = await asyncio.to_thread(self._load_rows)
        head = await asyncio.to_thread(db.head, sid)
        changes = self.changes
        changes.head = head
        changes.void(VOID_GAP if head else 0)  # no number the last owner may have handed out is reused
        changes.saved()
        self.board.set(sid, status.PRODUCTS, count)
        self._scan_pending_images()
        log.info("shard %d taken by %s: epoch %d, %d products loaded in %.2fs", sid, self.name, self.epoch, count,
                 time.monotonic() - started,
                 extra={"fields": {"shard": sid, "epoch": self.epoch, "products": count}})

    def _load_rows(self) -> int:
        store = self.store
        for product_id, packed in self.db.load(self.id):
            store.load(product_id, packed)
        return len(store)

    async def _commit(self) -> bool:
        """Save what changed if the epoch is still ours, answer what waited for it, then
        acknowledge every message applied so far."""
        if self.dirty:
            get = self.store.get_packed
            records = [(product_id, get(product_id)) for product_id in self.dirty]
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.db.save, self.id, self.epoch, records, self.changes.head)
            except psycopg.Error as exc:  # the database is down or refuses: keep everything, retry
                await self._commit_failed(exc)
                return False
            self.commit_seconds += time.monotonic() - started
            self.dirty.clear()
            self.changes.saved()
            self.board.add(self.id, status.COMMITS, 1)
            if self.commit_failing:
                self.commit_failing = False
                self.board.set(self.id, status.WRITES_REFUSED, 0)
                log.warning("shard %d commits again", self.id)
        self.next_commit = time.monotonic() + self.settings.commit_interval
        self._answer_acks(None)
        if self.handled is not None:
            handled, self.handled = self.handled, None
            await handled.ack(multiple=True)
        if self.to_enqueue:
            self._enqueue_images()
        return True

    async def _commit_failed(self, exc: Exception) -> None:
        self.next_commit = time.monotonic() + RETRY_COMMIT
        if not self.commit_failing:
            self.commit_failing = True
            self.board.set(self.id, status.WRITES_REFUSED, 1)
            log.error("shard %d cannot commit to the database: %s; its messages stay unacknowledged in the queue "
                      "and it retries every %.0fs", self.id, str(exc).strip(), RETRY_COMMIT)
        self._answer_acks(f"shard {self.id} could not commit: {str(exc).strip()}")
        await asyncio.to_thread(self._reconnect)

    def _reconnect(self) -> None:
        conn = self.db.conn
        if conn.closed or conn.broken:
            try:
                self.db = pgstore.PgStore(_connect(self.settings.database))
            except psycopg.Error:
                pass  # the next retry tries again

    async def _beat(self) -> bool:
        """The heartbeat in PostgreSQL; True when this owner should hand its shard to the preferred host."""
        if self.epoch is None:
            if self.preferred:
                await self._db_call(self.db.wait_for, self.id)
            return False
        seconds, self.commit_seconds = self.commit_seconds, 0.0
        wanted = await self._db_call(self.db.beat, self.id, self.epoch, len(self.store), seconds, PREFERRED_WAIT)
        return bool(wanted) and not self.preferred

    async def _db_call(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except pgstore.Fenced:
            raise
        except psycopg.Error as exc:
            log.warning("shard %d: database heartbeat failed: %s", self.id, str(exc).strip())
            await asyncio.to_thread(self._reconnect)
            return None

    async def _hand_over(self, connection) -> None:
        """Give the shard to its preferred host: commit, acknowledge, leave the queue, forget the
        state, and subscribe again (behind the preferred host, which becomes active)."""
        if not await self._commit():
            return
        await self._send_replies()
        await self.consumer.close()
        log.info("shard %d: handed over to its preferred owner host", self.id,
                 extra={"fields": {"shard": self.id, "epoch": self.epoch}})
        self._forget_state()
        await self._sleep(STANDBY_DELAY)
        await self._subscribe(connection)

    def _forget_state(self) -> None:
        self.epoch = None
        self.store.__init__()
        self.changes.__init__(self.changes.keep)
        self.dirty.clear()
        self.parked = None
        self.board.set(self.id, status.PRODUCTS, 0)

    async def _finish(self) -> int:
        """A stop: commit, acknowledge, and leave the queue, so that the next owner goes on at
        once from the first message this one did not apply."""
        sid = self.id
        deadline = time.monotonic() + self.stop_timeout
        if self.consumer is not None:
            await self.consumer.close()  # nothing more is delivered; what was, unapplied, goes back
        while self.epoch is not None and not await self._commit():
            if time.monotonic() >= deadline:
                log.error("shard %d could not commit within %.0fs; its unacknowledged messages go back to the queue "
                          "and the next owner applies them again", sid, self.stop_timeout)
                break
            await asyncio.sleep(RETRY_COMMIT)
        await self._send_replies()
        log.info("shard %d stops with %d products%s", sid, len(self.store),
                 "" if self.epoch is None else ", handing the shard over")
        return 0

    # ---- the broker

    def _on_connection_closed(self, *args) -> None:
        self.lost = "the broker connection closed"

    async def _ping(self) -> None:
        try:
            await self.reply_channel.default_exchange.publish(
                aio_pika.Message(protocol.Ping.pack(self.name)),
                routing_key=broker.queue_name(self.settings.cluster, self.id), mandatory=False)
        except aio_pika.exceptions.AMQPError as exc:
            self.lost = f"cannot publish: {exc}"

    def reply(self, address: bytes, request_id: int, payload: object) -> None:
        self.outgoing.append((address.decode(), protocol.pack_reply(request_id, payload)))

    async def _send_replies(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        exchange = self.reply_channel.default_exchange
        for routing_key, body in outgoing:
            try:
                # Not mandatory: an answer to an asker that is gone is dropped, as a datagram is on one host.
                await exchange.publish(aio_pika.Message(body), routing_key=routing_key, mandatory=False)
            except aio_pika.exceptions.AMQPError:
                self.board.add(self.id, status.DROPPED_REPLIES, 1)

    def _on_inbox(self) -> None:
        """The supervisor's STOP, and this host's image workers' results (forwarded to the queue,
        where the active owner, on whichever host, applies them in order)."""
        try:
            data = os.read(self.inbox_fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.stop_requested = True  # the supervisor is gone
            return
        for body in self.reader.feed(data):
            kind = _kind(body)
            if kind == protocol.STOP:
                self.stop_requested = True
            elif kind == protocol.IMAGE_RESULT:
                self.forward.append(body)

    async def _forward_results(self) -> None:
        exchange = self.forward_channel.default_exchange
        routing_key = broker.queue_name(self.settings.cluster, self.id)
        while self.forward:
            body = self.forward[0]
            try:
                await exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                       routing_key=routing_key)
            except aio_pika.exceptions.DeliveryError:  # the queue is full: try again next turn
                return
            self.forward.pop(0)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early for a stop."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.stop_requested and not self.lost:
            self.board.beat(self.id)
            await asyncio.sleep(min(0.1, end - time.monotonic()))


def _kind(body: bytes) -> int:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(body)
    return unpacker.unpack()[0]


def _connect(url: str):
    return psycopg.connect(url, autocommit=True, connect_timeout=5)
