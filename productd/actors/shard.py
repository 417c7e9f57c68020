"""A shard: the one process that owns a slice of the products.

It reads its inbox in order and applies each message to its store, one at a time, so no lock
is ever taken on a product. Reads are answered on the reply address their frame carries,
without blocking: a reply to a front-end thread that has gone away is dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time

import msgpack

from productd.actors import protocol, status
from productd.actors.inbox import silence
from productd.actors.status import StatusBoard
from productd.store.memory import ShardStore
from productd.store.sqlite import ShardFile

log = logging.getLogger("productd.shard")

READ_CHUNK = 1 << 16
IDLE_TICK = 1.0  # heartbeat period of an idle shard, seconds
RETRY_COMMIT = 1.0  # seconds between attempts after a failed commit
LOAD_REPORT_EVERY = 100_000
STALE_REPORT_EVERY = 10.0  # seconds: stale events are logged as a summary, not one line each
STOP_COMMIT_TRIES = 10


class Shard:
    """One shard's actor loop.

    durability "none" keeps products in memory only; "batch" commits what changed at least every
    `commit_interval` seconds; "sync" commits everything read from the inbox before it
    acknowledges the frames that asked for it (a group commit: one transaction per batch read).

    Dozing: when what it read held only events (nobody waits for an answer), the shard sets
    DOZING on the board and sleeps on its doorbell for `apply_delay` seconds instead of on its
    inbox, so the writes that come meanwhile cost the front end no wake-up and the shard one
    read for all of them. A reader rings the bell after queuing its frame, so every read is
    still answered at once and behind every event queued before it. Waking a shard per single
    event cost more CPU than applying it (README, "Apply delay").
    """

    def __init__(
        self,
        shard_id: int,
        inbox_fd: int,
        board: StatusBoard,
        *,
        path: str | None = None,
        durability: str = "none",
        commit_interval: float = 0.05,
        bell_fd: int = -1,
        apply_delay: float = 0.0,
    ) -> None:
        self.id = shard_id
        self.inbox_fd = inbox_fd
        self.bell_fd = bell_fd
        self.apply_delay = apply_delay
        self.board = board
        self.store = ShardStore()
        self.replies = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader = protocol.FrameReader()
        self.unpacker = protocol.body_unpacker()
        self.durability = durability
        self.commit_interval = commit_interval
        self.file = ShardFile(path, sync=durability == "sync") if durability != "none" and path else None
        self.dirty: set[str] = set()
        self.pending_acks: list[tuple[bytes, int]] = []
        self.next_commit = 0.0
        self.commit_failing = False
        self.reads_answered = 0  # reads in the last batch handled
        self.batch = _Batch()  # reused by every handle(): allocating one per call costs a GET 0.2 us

    def load(self) -> None:
        if self.file is None:
            return
        started = time.monotonic()
        board, sid, store = self.board, self.id, self.store
        for count, (product_id, packed) in enumerate(self.file.rows(), 1):
            store.load(product_id, packed)
            if count % LOAD_REPORT_EVERY == 0:
                board.set(sid, status.PRODUCTS, count)
                board.beat(sid)
                log.info("shard %d loading: %d products so far", sid, count)
        log.info("shard %d loaded %d products from %s in %.2fs",
                 sid, len(store), self.file.path, time.monotonic() - started)

    def run(self) -> int:
        """Load, then serve until a STOP message; returns the process exit code."""
        board, sid = self.board, self.id
        board.beat(sid)
        self.load()
        board.set(sid, status.PRODUCTS, len(self.store))
        board.set(sid, status.DOZING, 0)  # a predecessor may have died dozing
        board.beat(sid)
        board.set(sid, status.STATE, status.READY)
        log.info("shard %d ready with %d products", sid, len(self.store))
        fd, bell = self.inbox_fd, self.bell_fd
        os.set_blocking(fd, False)
        awake, dozing_poll = select.poll(), select.poll()
        awake.register(fd, select.POLLIN)
        if bell >= 0:
            awake.register(bell, select.POLLIN)
            dozing_poll.register(bell, select.POLLIN)
        delay = self.apply_delay if bell >= 0 else 0.0
        dozing = recheck = False
        doze_until = 0.0
        stale_reported, next_stale_report = board.get(sid, status.STALE), time.monotonic() + STALE_REPORT_EVERY
        while True:
            board.beat(sid)
            now = time.monotonic()
            if now >= next_stale_report:
                stale = board.get(sid, status.STALE)
                if stale > stale_reported:
                    log.info("shard %d ignored %d stale events (version not newer than stored) in the last %.0fs",
                             sid, stale - stale_reported, STALE_REPORT_EVERY,
                             extra={"fields": {"shard": sid, "stale": stale - stale_reported, "stale_total": stale}})
                stale_reported, next_stale_report = stale, now + STALE_REPORT_EVERY
            checking, recheck = recheck, False
            if not checking:
                wake_at = now + IDLE_TICK
                if self.dirty:
                    wake_at = min(wake_at, self.next_commit)
                if dozing:
                    wake_at = min(wake_at, doze_until)
                # +1: poll counts whole milliseconds, and waking a little early would spin
                ready = (dozing_poll if dozing else awake).poll(max(0, int((wake_at - now) * 1000) + 1))
                rang = False
                for ready_fd, _ in ready:
                    if ready_fd == bell:
                        rang = silence(bell)
                if dozing and not rang and time.monotonic() < doze_until:
                    self.commit_if_due()  # a heartbeat or a commit while the events gather
                    continue
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                data = b""
            if data:
                if self.handle(self.reader.feed(data)):
                    return self.finish()
                # Only events came: let the next ones gather, unless a reader or a sync writer waits.
                doze = delay > 0 and not self.reads_answered and not self.pending_acks
                recheck = len(data) == READ_CHUNK  # more may be queued already
                doze_until = time.monotonic() + delay
            else:
                doze = dozing and checking  # a doze that brought nothing means the writes stopped
            if doze != dozing:
                dozing = doze
                board.set(sid, status.DOZING, int(dozing))
                # A reader who queued a frame before the flag went up did not ring: look once more.
                recheck = recheck or dozing
            self.commit_if_due()

    def commit_if_due(self) -> None:
        if self.pending_acks or (self.dirty and time.monotonic() >= self.next_commit):
            self.commit()

    def finish(self) -> int:
        for _ in range(STOP_COMMIT_TRIES):
            if self.commit():
                if self.file is not None:
                    self.file.close()  # folds the WAL into the file: a clean copy for backups
                log.info("shard %d drained its inbox and stops with %d products", self.id, len(self.store))
                return 0
            time.sleep(RETRY_COMMIT)
        log.error("shard %d stops with %d changed products it could not commit", self.id, len(self.dirty))
        return 75

    def commit(self) -> bool:
        """Save every changed product in one transaction, then answer the frames waiting for it."""
        if self.file is not None and self.dirty:
            records = self.store.get_packed
            try:
                self.file.save((product_id, records(product_id)) for product_id in self.dirty)
            except Exception as exc:  # disk full, I/O error, ...: keep the changes and retry
                self.next_commit = time.monotonic() + RETRY_COMMIT
                if not self.commit_failing:
                    self.commit_failing = True
                    self.board.set(self.id, status.WRITES_REFUSED, 1)
                    log.error("shard %d cannot commit to %s: %s; refusing writes and retrying every %.0fs",
                              self.id, self.file.path, exc, RETRY_COMMIT)
                self._answer_acks(f"shard {self.id} could not commit: {exc}")
                return False
            self.dirty.clear()
            self.board.add(self.id, status.COMMITS, 1)
            if self.commit_failing:
                self.commit_failing = False
                self.board.set(self.id, status.WRITES_REFUSED, 0)
                log.warning("shard %d commits again; taking writes", self.id)
        self.next_commit = time.monotonic() + self.commit_interval
        self._answer_acks(None)
        return True

    def _answer_acks(self, error: str | None) -> None:
        for address, request_id in self.pending_acks:
            self.reply(address, request_id, error)
        self.pending_acks.clear()

    def handle(self, bodies: list[bytes]) -> bool:
        """Apply a batch of messages in order; True when one of them was STOP."""
        store, board, sid = self.store, self.board, self.id
        items = self.unpacker
        handlers = HANDLERS
        batch = self.batch
        batch.now = time.time_ns()  # one read of the inbox is applied at one moment
        batch.received = batch.applied = batch.reads = 0
        stop = False
        for body in bodies:
            items.feed(body)  # whole, CRC-checked bodies: the unpacker is empty after each
            head = items.unpack()
            if handlers.get(head[0], _ignore)(self, head, items, batch):
                stop = True
                break
        if self.file is None:
            self.dirty.clear()
        received = batch.received
        if received:  # a batch of reads alone touches one counter: this runs once per wake-up
            applied = batch.applied
            board.observe_applies(sid, batch.now, batch.waits)
            batch.waits.clear()
            board.add(sid, status.RECEIVED, received)
            board.add(sid, status.APPLIED, applied)
            board.add(sid, status.STALE, received - applied)
            board.set(sid, status.PRODUCTS, len(store))
        reads = batch.reads
        if reads:
            board.add(sid, status.READS, reads)
        self.reads_answered = reads
        if self.reader.skipped:
            board.add(sid, status.SKIPPED_BYTES, self.reader.skipped)
            log.warning("shard %d skipped %d bytes of a frame its predecessor had half read",
                        sid, self.reader.skipped)
            self.reader.skipped = 0
        return stop

    # The handlers of the message kinds (HANDLERS, below the class): each takes the header array,
    # the unpacker holding what follows it in the body and the batch, and returns True to stop.
    # A handler names the header's items by unpacking the array into the fields of its kind's
    # NamedTuple in protocol.py, in their order: building the NamedTuple instead (Get.unpack)
    # measured 0.3 us more per message, on a handle() of one GET that takes 0.65 us. The shard
    # round trip in tests/test_protocol.py fails if a handler's names and the definition disagree.

    def _on_events(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, reply_to, request_id, accepted_ns, count = head  # protocol.Events
        store, dirty, now = self.store, self.dirty, batch.now
        received = applied = 0
        for product_id, price, stock, version in items:
            received += 1
            if store.apply(product_id, price, stock, version, now):
                applied += 1
                dirty.add(product_id)
        batch.received += received
        batch.applied += applied
        batch.waits.append((accepted_ns, count))
        if reply_to is not None:
            self.pending_acks.append((reply_to, request_id))
        return False

    def _on_get(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, reply_to, request_id, product_id = head  # protocol.Get
        batch.reads += 1
        self.reply(reply_to, request_id, self.store.get_packed(product_id))
        return False

    def _on_stop(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        return True

    def reply(self, address: bytes, request_id: int, payload: object) -> None:
        try:
            self.replies.sendto(protocol.pack_reply(request_id, payload), socket.MSG_DONTWAIT, address)
        except OSError as exc:
            # ECONNREFUSED/ENOENT: the asking thread is gone; EAGAIN: it stopped reading.
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                raise
            self.board.add(self.id, status.DROPPED_REPLIES, 1)


class _Batch:
    """What one handle() call gathers for the status board, written to it once at the end."""

    __slots__ = ("now", "received", "applied", "reads", "waits")

    def __init__(self) -> None:
        self.now = 0
        self.received = self.applied = self.reads = 0
        self.waits: list[tuple[int, int]] = []  # (accepted_at ns, events) per frame: the apply histogram


def _ignore(shard: Shard, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
    """A kind this shard does not know is skipped, as it always was: never a reason to die."""
    return False


# One handler per message kind in protocol.KINDS; tests/test_protocol.py checks none is missing.
HANDLERS = {
    protocol.EVENTS: Shard._on_events,
    protocol.GET: Shard._on_get,
    protocol.STOP: Shard._on_stop,
}
