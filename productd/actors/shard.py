"""A shard: the one process that owns a slice of the products.

It reads its inbox in order and applies each message to its store, one at a time, so no lock
is ever taken on a product. Reads are answered on the reply address their frame carries,
without blocking: a reply to a front-end thread that has gone away is dropped.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import socket
import sqlite3
import time

import msgpack

from productd.actors import protocol, status
from productd.actors.inbox import silence
from productd.actors.status import StatusBoard
from productd.store import catalogue, listing, recovery
from productd.store.changes import OK, ChangeLog
from productd.store.memory import ShardStore
from productd.store.record import details, pending_images, revision, with_image_result
from productd.store.reshard_history import FOREIGN, Origins
from productd.store.sqlite import ShardFile

log = logging.getLogger("productd.shard")

READ_CHUNK = 1 << 16
IDLE_TICK = 1.0  # heartbeat period of an idle shard, seconds
RETRY_COMMIT = 1.0  # seconds between attempts after a failed commit
LOAD_REPORT_EVERY = 100_000
STALE_REPORT_EVERY = 10.0  # seconds: stale events are logged as a summary, not one line each
# Pieces of a message that is cut into frames (protocol.Part) wait this long for the rest: a
# front end that died half way leaves pieces that nobody will finish.
PARTS_TIMEOUT = 30.0
MAX_PARTS_BYTES = 64 * 1024 * 1024  # past this the oldest unfinished message is dropped
# The pieces of a big reply that did not fit the reply socket at once are sent again for this
# long (each loop turn, at most OUTBOX_TICK apart); then they are dropped and counted.
OUTBOX_TIMEOUT = 10.0
OUTBOX_TICK = 0.002
# Exit codes of a shard that was told to stop but could not commit everything it had applied.
EXIT_SAVED = 75  # EX_TEMPFAIL: the changes are in its recovery file; the next start commits them
EXIT_LOST = 74  # EX_IOERR: they could not be saved anywhere either; the log says how many were lost
# The change feed (_on_changes): at most this many changes per answer, history entries looked at
# per answer (filters), parked requests per shard, seconds one stays parked; the head's jump at a
# durable start (ChangeLog.void: more changes than one life can apply without committing).
FEED_LIMIT = 2000
FEED_SCAN = 20_000
MAX_PARKED = 4096
MAX_PARK = 60.0
VOID_GAP = 1 << 32


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
    event cost more CPU than applying it (docs/design.md, "Apply delay").
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
        stop_timeout: float = 30.0,
        recovery_reserve: int = 0,
        change_history: int = 100_000,
        images=None,  # productd.images.settings.ImageSettings: the job queue to enqueue to; None: no pipeline
    ) -> None:
        self.id = shard_id
        self.inbox_fd = inbox_fd
        self.bell_fd = bell_fd
        self.apply_delay = apply_delay
        self.board = board
        self.store = ShardStore()
        self.changes = ChangeLog(change_history)
        self.replies = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader = protocol.FrameReader()
        self.unpacker = protocol.body_unpacker()
        self.durability = durability
        self.commit_interval = commit_interval
        self.file = ShardFile(path, sync=durability == "sync") if durability != "none" and path else None
        # Nothing to commit: changes count as saved once applied. A subclass that commits
        # elsewhere (productd.cluster.owner) turns it off.
        self.memory_only = self.file is None
        self.dirty: set[str] = set()
        self.uncommitted_events = 0  # applied events behind `dirty`, for the log of a stop that cannot commit
        self.stop_timeout = stop_timeout
        self.recovery_reserve = recovery_reserve
        self.recovery = recovery.RecoveryFile(recovery.path_for(path)) if self.file is not None else None
        self.last_commit_error = ""
        self.recovery_pending = False  # the recovery file holds changes not committed yet
        self.pending_acks: list[tuple[bytes, int]] = []
        self.next_commit = 0.0
        self.commit_failing = False
        self.reads_answered = 0  # reads in the last batch handled
        self.batch = _Batch()  # reused by every handle(): allocating one per call costs a GET 0.2 us
        self.parts: dict[tuple[bytes, int], tuple[float, list[bytes]]] = {}  # unfinished Part messages
        self.parts_bytes = 0
        self.outbox: collections.deque = collections.deque()  # (deadline, address, datagrams left)
        self.handlers = HANDLERS  # STOPPING_HANDLERS once a STOP was read
        self.images = images
        self.jobs = None  # the JobQueue, opened in run() (after the fork: one connection per process)
        # Image URLs a write added, by product, to enqueue once the write is committed (with
        # durability none: once applied): a job must never name a change a crash could undo.
        self.to_enqueue: dict[str, list[str]] = {}
        self.origins: Origins | None = None  # the history a reshard carried here, for old cursors

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
        rows, owners = self.file.changes(self.changes.keep)
        self.changes.load(rows, self.file.max_revision(), owners)
        origins = self.file.origins()
        self.origins = Origins.unpack(origins) if origins else None
        self._apply_recovery()
        self.file.start_checkpointer()
        try:
            self.recovery.reserve(self.recovery_reserve)
        except OSError as exc:
            log.warning("shard %d cannot reserve %d bytes for its recovery file %s: %s; until it can, a stop "
                        "while the disk is full may lose the changes it has not committed yet",
                        sid, self.recovery_reserve, self.recovery.path, exc.strerror)

    def _apply_recovery(self) -> None:
        """Commit what a stop that could not commit left in the recovery file, then empty it.

        A record applies only if it is newer than the committed one, so applying the file twice
        (a crash between the commit and the clear) changes nothing. If the disk still refuses the
        commit, the shard starts anyway with the products in memory, uncommitted, refusing
        writes and retrying like any failing commit; the file is emptied after the first commit
        that succeeds (and a stop before that saves them again).
        """
        records = recovery.read(self.recovery.path)
        if not records:
            return
        store = self.store
        for product_id, packed in records:
            current = store.get_packed(product_id)
            if packed is None or current is None or revision(current) < revision(packed):
                store.put(product_id, packed)
        self.dirty.update(product_id for product_id, _ in records)
        self.recovery_pending = True
        if not self.commit():
            log.error("shard %d cannot commit the %d products of its recovery file %s to %s yet (%s); it serves "
                      "them from memory, refuses writes and retries: free space or fix the disk",
                      self.id, len(records), self.recovery.path, self.file.path, self.last_commit_error,
                      extra={"fields": {"shard": self.id, "recovered_products": len(records)}})
            return
        log.warning("shard %d committed %d products from its recovery file %s, left by a stop that could not "
                    "commit them", self.id, len(records), self.recovery.path,
                    extra={"fields": {"shard": self.id, "recovered_products": len(records)}})

    def run(self) -> int:
        """Load, then serve until a STOP message; returns the process exit code.

        Each turn: wait (on the inbox, or on the doorbell while dozing), read and apply what
        came, then decide whether to doze before the next read.
        """
        board, sid = self.board, self.id
        board.beat(sid)
        self._open_jobs()
        self.load()
        self._resume_feed()
        self._scan_pending_images()
        board.set(sid, status.PRODUCTS, len(self.store))
        board.set(sid, status.DOZING, 0)  # a predecessor may have died dozing
        board.beat(sid)
        board.set(sid, status.STATE, status.READY)
        log.info("shard %d ready with %d products", sid, len(self.store))
        os.set_blocking(self.inbox_fd, False)
        self._awake, self._dozing_poll = select.poll(), select.poll()
        self._awake.register(self.inbox_fd, select.POLLIN)
        if self.bell_fd >= 0:
            self._awake.register(self.bell_fd, select.POLLIN)
            self._dozing_poll.register(self.bell_fd, select.POLLIN)
        self.dozing = self.recheck = False
        self.doze_until = 0.0
        self._stale_reported = board.get(sid, status.STALE)
        self._next_stale_report = time.monotonic() + STALE_REPORT_EVERY
        while True:
            board.beat(sid)
            self._report_stale()
            if self.outbox:
                self._send_outbox()
            checking, self.recheck = self.recheck, False
            if not checking and not self._wait():
                self.commit_if_due()  # a heartbeat or a commit while the events gather
                continue
            data = self._read()
            if data and self.handle(self.reader.feed(data)):
                return self.finish()
            self._decide_doze(data, checking)
            self.commit_if_due()
            self._feed_turn()

    def _wait(self) -> bool:
        """Sleep until the inbox (or, dozing, the doorbell) has something, a commit is due or a
        heartbeat; False when a doze should go on (nobody rang and its time is not up)."""
        now = time.monotonic()
        wake_at = now + IDLE_TICK
        if self.dirty:
            wake_at = min(wake_at, self.next_commit)
        if self.dozing:
            wake_at = min(wake_at, self.doze_until)
        if self.outbox:
            wake_at = min(wake_at, now + OUTBOX_TICK)
        # +1: poll counts whole milliseconds, and waking a little early would spin
        ready = (self._dozing_poll if self.dozing else self._awake).poll(max(0, int((wake_at - now) * 1000) + 1))
        rang = False
        for ready_fd, _ in ready:
            if ready_fd == self.bell_fd:
                rang = silence(self.bell_fd)
        return not self.dozing or rang or time.monotonic() >= self.doze_until

    def _read(self) -> bytes:
        try:
            return os.read(self.inbox_fd, READ_CHUNK)
        except BlockingIOError:
            return b""

    def _decide_doze(self, data: bytes, checking: bool) -> None:
        """Doze after a read that held only events (nobody waits for an answer); wake up when a
        doze brought nothing, which means the writes stopped."""
        delay = self.apply_delay if self.bell_fd >= 0 else 0.0
        if data:
            doze = delay > 0 and not self.reads_answered and not self.pending_acks
            self.recheck = len(data) == READ_CHUNK  # more may be queued already
            self.doze_until = time.monotonic() + delay
        else:
            doze = self.dozing and checking
        if doze != self.dozing:
            self.dozing = doze
            self.board.set(self.id, status.DOZING, int(doze))
            # A reader who queued a frame before the flag went up did not ring: look once more.
            self.recheck = self.recheck or doze

    def _report_stale(self) -> None:
        """Stale events are logged as a summary every STALE_REPORT_EVERY seconds, not one line each."""
        now = time.monotonic()
        if now < self._next_stale_report:
            return
        sid = self.id
        stale = self.board.get(sid, status.STALE)
        if stale > self._stale_reported:
            log.info("shard %d ignored %d stale events (version not newer than stored) in the last %.0fs",
                     sid, stale - self._stale_reported, STALE_REPORT_EVERY,
                     extra={"fields": {"shard": sid, "stale": stale - self._stale_reported, "stale_total": stale}})
        self._stale_reported, self._next_stale_report = stale, now + STALE_REPORT_EVERY

    def commit_if_due(self) -> None:
        if self.pending_acks or (self.dirty and time.monotonic() >= self.next_commit):
            self.commit()

    def finish(self) -> int:
        """Commit what is left after STOP; returns the exit code.

        What is already queued behind the STOP is handled first (_drain). A commit that fails is
        retried for `stop_timeout` seconds while the shard goes on handling what reaches its inbox
        (events are applied, reads are answered UNAVAILABLE). After that the changes go to the recovery file and
        the shard exits with EXIT_SAVED, which the supervisor reports instead of restarting it.
        """
        deadline = time.monotonic() + self.stop_timeout
        self._drain(deadline)
        while not self.commit():
            left = deadline - time.monotonic()
            if left <= 0:
                return self._save_for_recovery()
            # Saved at once, and again after each retry's new changes: a shard killed while it
            # retries (systemd's stop timeout, an operator's kill -9) leaves them in the file too.
            # The commit that succeeds after all empties the file again (recovery_pending).
            try:
                self.recovery.save(self._uncommitted())
                self.recovery_pending = True
            except OSError:
                pass  # the last attempt at the deadline logs what is lost
            self._serve_for(min(RETRY_COMMIT, left))
        if self.file is not None:
            self.file.close()  # folds the WAL into the file: a clean copy for backups
        log.info("shard %d drained its inbox and stops with %d products", self.id, len(self.store))
        return 0

    def _drain(self, deadline: float) -> None:
        """After STOP: handle what is already queued behind it (events are applied, reads are told
        UNAVAILABLE), so nothing accepted is dropped and no reader waits out its timeout."""
        while time.monotonic() < deadline:
            data = self._read()
            if not data:
                return
            self.handle(self.reader.feed(data))

    def _serve_for(self, seconds: float) -> None:
        """While a stop waits to commit: handle whatever comes in for up to `seconds`."""
        self.board.beat(self.id)
        poller = select.poll()
        poller.register(self.inbox_fd, select.POLLIN)
        if poller.poll(max(1, int(seconds * 1000))):
            data = self._read()
            if data:
                self.handle(self.reader.feed(data))

    def _save_for_recovery(self) -> int:
        sid, products, events = self.id, len(self.dirty), self.uncommitted_events
        fields = {"shard": sid, "uncommitted_products": products, "uncommitted_events": events,
                  "recovery_file": self.recovery.path}
        try:
            self.recovery.save(self._uncommitted())
        except OSError as exc:
            log.error("shard %d stops with %d changed products (%d events) that it could neither commit to %s (%s) "
                      "nor save to %s (%s): they are lost", sid, products, events, self.file.path,
                      self.last_commit_error, self.recovery.path, exc.strerror, extra={"fields": fields})
            return EXIT_LOST
        log.error("shard %d could not commit %d changed products (%d events) to %s within %.0fs (%s); they are saved "
                  "in %s, and the next start commits them: free space or fix the disk, then start productd again",
                  sid, products, events, self.file.path, self.stop_timeout, self.last_commit_error,
                  self.recovery.path, extra={"fields": fields})
        return EXIT_SAVED

    def _uncommitted(self) -> list[tuple[str, bytes | None]]:
        get = self.store.get_packed
        return [(product_id, get(product_id)) for product_id in self.dirty]

    def commit(self) -> bool:
        """Save every changed product in one transaction, then answer the frames waiting for it."""
        if self.file is not None and self.dirty:
            records = self.store.get_packed
            changes = self.changes
            try:
                self.file.save([(product_id, records(product_id)) for product_id in self.dirty],
                               changes.unsaved, changes.oldest(), changes.owners)
            except Exception as exc:  # disk full, I/O error, ...: keep the changes and retry
                self.next_commit = time.monotonic() + RETRY_COMMIT
                self.last_commit_error = str(exc)
                if not self.commit_failing:
                    self.commit_failing = True
                    self.board.set(self.id, status.WRITES_REFUSED, 1)
                    log.error("shard %d cannot commit to %s: %s; refusing writes and retrying every %.0fs",
                              self.id, self.file.path, exc, RETRY_COMMIT)
                self._answer_acks(f"shard {self.id} could not commit: {exc}")
                return False
            if self.recovery_pending:  # what the recovery file held is committed now
                self.file.sync()  # on disk before the file is emptied, whatever --durability says
                self.recovery.clear()
                self.recovery_pending = False
            self.dirty.clear()
            self.changes.saved()
            self.uncommitted_events = 0
            self.board.add(self.id, status.COMMITS, 1)
            if self.commit_failing:
                self.commit_failing = False
                self.board.set(self.id, status.WRITES_REFUSED, 0)
                log.warning("shard %d commits again; taking writes", self.id)
        self.next_commit = time.monotonic() + self.commit_interval
        self._answer_acks(None)
        if self.to_enqueue:
            self._enqueue_images()
        return True

    def _answer_acks(self, error: str | None) -> None:
        """Answer what waited for a commit: an Events frame gets None or the error; a catalogue
        write gets its outcome, or FAILED with the error."""
        for address, request_id, outcome in self.pending_acks:
            if outcome is None:
                self.reply(address, request_id, error)
            else:
                self.reply(address, request_id, outcome if error is None else [catalogue.FAILED, error])
        self.pending_acks.clear()

    def handle(self, bodies: list[bytes]) -> bool:
        """Apply a batch of messages in order; True when one of them was STOP.

        What follows a STOP is still handled, by STOPPING_HANDLERS: events queued behind it were
        accepted and are applied, reads are answered UNAVAILABLE.
        """
        store, board, sid = self.store, self.board, self.id
        items = self.unpacker
        handlers = self.handlers
        batch = self.batch
        batch.now = time.time_ns()  # one read of the inbox is applied at one moment
        batch.received = batch.applied = batch.reads = batch.writes = 0
        stop = False
        for body in bodies:
            items.feed(body)  # whole, CRC-checked bodies: the unpacker is empty after each
            head = items.unpack()
            if handlers.get(head[0], _ignore)(self, head, items, batch):
                stop = True
                handlers = self.handlers  # _on_stop switched to STOPPING_HANDLERS
        if self.memory_only:
            self.dirty.clear()
            self.changes.saved()
            if self.to_enqueue:  # nothing to commit first: the jobs are queued once applied
                self._enqueue_images()
        else:
            self.uncommitted_events += batch.applied
        received = batch.received
        if batch.writes:
            board.set(sid, status.PRODUCTS, len(store))
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
        self.reads_answered = reads + batch.writes  # someone waits for these: no doze after them
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
        apply, dirty, now = self.store.apply, self.dirty, batch.now
        changes = self.changes
        seq = changes.head
        history, unsaved = changes.entries.append, changes.unsaved.append
        received = applied = 0
        for product_id, price, stock, version in items:
            received += 1
            new = apply(product_id, price, stock, version, now, seq + 1)
            if new is not None:
                seq += 1
                entry = (seq, product_id, new)
                history(entry)
                unsaved(entry)
                applied += 1
                dirty.add(product_id)
        changes.head = seq
        batch.received += received
        batch.applied += applied
        batch.waits.append((accepted_ns, count))
        if reply_to is not None:
            self.pending_acks.append((reply_to, request_id, None))
        return False

    def _on_get(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, reply_to, request_id, product_id = head  # protocol.Get
        batch.reads += 1
        self.reply(reply_to, request_id, self.store.get_packed(product_id))
        return False

    def _on_stop(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        self.handlers = STOPPING_HANDLERS
        return True

    def _on_write(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, reply_to, request_id, op, product_id, fields, if_match, if_none_match = head  # protocol.Write
        changes = self.changes
        seq = changes.head + 1
        outcome, value = catalogue.apply(
            self.store.get_packed(product_id), op, fields, if_match, if_none_match, batch.now, seq
        )
        batch.writes += 1
        if outcome in (catalogue.OK, catalogue.CREATED):
            if value is not None and self.images is not None:
                self._note_new_images(product_id, value)
            self.store.put(product_id, value)
            changes.append(seq, product_id, value)
            self.dirty.add(product_id)
            if self.durability == "sync" and not self.memory_only:
                self.pending_acks.append((reply_to, request_id, [outcome, value]))
                return False
        self.reply(reply_to, request_id, [outcome, value])
        return False

    # ---- the image pipeline (docs/images.md, "Queuing the jobs" and "Reaching the product")

    def _open_jobs(self) -> None:
        if self.images is None:
            return
        from productd.images.jobs import JobQueue  # only a shard with the pipeline pays for the import

        s = self.images
        try:
            self.jobs = JobQueue(s.jobs_path, s.max_attempts, s.backoff())
        except (sqlite3.Error, OSError) as exc:
            # The shard serves without it: images stay pending, and the next start's scan queues them.
            log.error("shard %d cannot open the image job queue %s: %s; new images stay pending until a restart",
                      self.id, s.jobs_path, exc)

    def _note_new_images(self, product_id: str, new: bytes) -> None:
        """Remember the URLs of `new` that the product did not show before, to enqueue."""
        old = self.store.get_packed(product_id)
        old_details = None if old is None else details(old)
        shown = () if old_details is None else old_details[3]
        added = [url for url in pending_images(new) if url not in shown]
        if added:
            self.to_enqueue.setdefault(product_id, []).extend(added)

    def _scan_pending_images(self) -> None:
        """At load: queue every image a product shows as pending. Repairs a crash between a commit
        and its enqueue (and a result lost in a crash): a URL already queued keeps its job, one
        already ended is applied at once from the queue."""
        if self.jobs is None:
            return
        for product_id, packed in self.store.items():
            urls = pending_images(packed)
            if urls:
                self.to_enqueue[product_id] = urls
        if self.to_enqueue:
            log.info("shard %d queues the pending images of %d products", self.id, len(self.to_enqueue))
            self._enqueue_images()

    def _enqueue_images(self) -> None:
        """One JobQueue transaction for every URL noted; the ones already ended apply at once."""
        if self.jobs is None:
            self.to_enqueue.clear()
            return
        pairs = [(url, product_id) for product_id, urls in self.to_enqueue.items() for url in urls]
        try:
            ended = self.jobs.enqueue_many(pairs)
        except sqlite3.Error as exc:  # locked past the busy timeout, a full disk: kept, tried after the next commit
            log.error("shard %d cannot queue %d image jobs: %s; trying again after the next commit (a restart's scan "
                      "queues them too)", self.id, len(pairs), exc)
            return
        self.to_enqueue.clear()
        now = time.time_ns()
        for product_id, url, result in ended:
            self._apply_image_result(product_id, url, result, now)

    def _apply_image_result(self, product_id: str, url: str, result: tuple, now_ns: int) -> bool:
        """Show `result` on the product, as a change (new revision, in the feed); False when it is
        dropped (product gone, URL no longer shown) or already there."""
        current = self.store.get_packed(product_id)
        seq = self.changes.head + 1
        new = None if current is None else with_image_result(current, url, result, now_ns, seq)
        if new is None:
            shown = None if current is None else details(current)
            if shown is None or url not in shown[3]:
                self.board.add(self.id, status.IMAGE_RESULTS_DROPPED, 1)
                log.debug("shard %d dropped the image result for %s of %s: no longer shown", self.id, url, product_id)
            return False
        self.store.put(product_id, new)
        self.changes.append(seq, product_id, new)
        self.dirty.add(product_id)
        return True

    def _on_image_result(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, product_id, url, result = head  # protocol.ImageResult
        self._apply_image_result(product_id, url, result, batch.now)
        return False

    def _on_get_many(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, reply_to, request_id, product_ids = head  # protocol.GetMany
        get = self.store.get_packed
        batch.reads += 1
        self.reply(reply_to, request_id, [get(product_id) for product_id in product_ids])
        return False

    def _on_part(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, reply_to, request_id, last, chunk = head  # protocol.Part
        key = (reply_to, request_id)
        now = time.monotonic()
        entry = self.parts.get(key)
        if entry is None:
            entry = self.parts[key] = (now, [])
            self._drop_old_parts(now)
        entry[1].append(chunk)
        self.parts_bytes += len(chunk)
        if not last:
            return False
        del self.parts[key]
        body = b"".join(entry[1])
        self.parts_bytes -= len(body)
        whole = protocol.body_unpacker()  # the shared one is in the middle of this Part's body
        whole.feed(body)
        inner = whole.unpack()
        return self.handlers.get(inner[0], _ignore)(self, inner, whole, batch)

    def _drop_old_parts(self, now: float) -> None:
        """Forget messages whose last piece did not come in time, or the oldest when they hold too much."""
        for key, (started, chunks) in list(self.parts.items()):
            if now - started < PARTS_TIMEOUT and self.parts_bytes <= MAX_PARTS_BYTES:
                break  # oldest first: dicts keep insertion order
            del self.parts[key]
            self.parts_bytes -= sum(map(len, chunks))
            log.warning("shard %d dropped an unfinished message of %d pieces (its sender stopped sending)",
                        self.id, len(chunks))

    def _on_list(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, reply_to, request_id, filters, sort, after, limit = head  # protocol.List
        batch.reads += 1
        try:
            page = listing.select(self.store, filters, sort, after, limit)
        except Exception:  # the front end checks every value; a bad one must not end the shard
            log.exception("shard %d could not answer a listing (filters %r, sort %r)", self.id, filters, sort)
            page = None
        self.reply(reply_to, request_id, [self.changes.head, page])
        return False

    def _on_ask_stopping(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        """Behind a STOP, whatever asks for an answer (a read, a catalogue write) gets UNAVAILABLE
        at once and changes nothing: its client is told to try again (503)."""
        self.reply(head[1], head[2], protocol.UNAVAILABLE)  # every such kind: (kind, reply_to, request_id, ...)
        return False

    # ---- the change feed (protocol.Changes, GET /changes)

    # Changes requests waiting for a change: [deadline, reply_to, request_id, after, user_id, ids, limit]
    parked: list | None = None
    parked_head = 0  # the head when the parked requests were last looked at

    def _resume_feed(self) -> None:
        """Start this life of the change history (after load). A durable shard jumps its head by
        VOID_GAP and records the range (changes.ChangeLog.void): a subscriber who saw changes a
        kill -9 lost (applied, not committed) is refused (410) instead of being handed the new
        changes that reuse those numbers. The marker is committed before the shard is ready.
        A fresh file skips the gap (nothing was ever numbered). Products newer than the history
        (a recovery file, a reshard) mean it does not hold every change: it starts over. With
        durability none nothing survives a restart: the head starts at the clock's microseconds,
        above any number an earlier life handed out (unless it averaged a million changes/s)."""
        changes = self.changes
        if self.file is None:
            changes.head = max(changes.head, time.time_ns() // 1000)
            return
        entries = changes.entries
        last = entries[-1][0] if entries else 0
        newest = self.file.max_revision()
        fresh = not entries and newest == 0
        if newest > last:
            changes.forget()
            changes.head = max(changes.head, newest)
        marker = changes.void(0 if fresh else VOID_GAP)
        self.file.save([], [marker], changes.oldest())
        changes.saved()

    def _on_changes(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        _, reply_to, request_id, after, user_id, ids, limit, wait = head  # protocol.Changes
        batch.reads += 1
        changes = self.changes
        if after is None:
            self.reply(reply_to, request_id, [OK, changes.head, changes.oldest(), changes.head, []])
            return False
        if isinstance(after, (list, tuple)):  # a cursor from before a reshard (productd.store.reshard_history)
            status_, after = self.origins.translate(after) if self.origins else (FOREIGN, 0)
            if status_ != OK:
                self.reply(reply_to, request_id, [status_, changes.head, changes.oldest(), 0, []])
                return False
        wanted = None if ids is None else frozenset(ids)
        limit = max(1, min(int(limit), FEED_LIMIT))
        status_, scanned_to, found = changes.since(after, limit, user_id, wanted, FEED_SCAN)
        if found or status_ != OK or not wait or scanned_to < changes.head:
            self.reply(reply_to, request_id, [status_, changes.head, changes.oldest(), scanned_to, found])
            return False
        parked = self.parked
        if parked is None:
            parked = self.parked = []
        if len(parked) >= MAX_PARKED:  # the oldest is answered empty: its subscriber asks again
            self._answer_parked_one(parked.pop(0), force=True)
        self.parked_head = changes.head
        parked.append([time.monotonic() + min(float(wait), MAX_PARK), reply_to, request_id, scanned_to,
                       user_id, wanted, limit])
        return False

    def _feed_turn(self) -> None:
        """After a batch (and, with sync, its commit): answer the parked requests that now have
        changes, and those whose time is up (empty). Filtered ones that got nothing stay."""
        parked = self.parked
        if not parked:
            return
        changed = self.changes.head != self.parked_head
        now = time.monotonic()
        if not changed and now < parked[0][0]:
            return
        self.parked_head = self.changes.head
        keep = []
        for entry in parked:
            if not self._answer_parked_one(entry, force=now >= entry[0], look=changed):
                keep.append(entry)
        keep.sort(key=_deadline)
        self.parked = keep

    def _answer_parked_one(self, entry: list, *, force: bool, look: bool = True) -> bool:
        """Answer one parked request if it has changes (or `force`); False if it stays parked."""
        changes = self.changes
        _, reply_to, request_id, after, user_id, wanted, limit = entry
        if look:
            status_, scanned_to, found = changes.since(after, limit, user_id, wanted, FEED_SCAN)
        else:
            status_, scanned_to, found = OK, after, []
        if not found and status_ == OK and not force:
            entry[3] = scanned_to
            return False
        self.reply(reply_to, request_id, [status_, changes.head, changes.oldest(), scanned_to, found])
        return True

    def _on_write_feed(self, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
        """protocol.Write, noting whose product a delete removes (the feed's user_id filter)."""
        if head[3] == catalogue.DELETE:
            before = self.store.get_packed(head[4])
            seq = self.changes.head
            stop = Shard._on_write(self, head, items, batch)
            if self.changes.head != seq:
                self.changes.note_delete(self.changes.head, before)
            return stop
        return Shard._on_write(self, head, items, batch)

    def reply(self, address: bytes, request_id: int, payload: object) -> None:
        datagrams = protocol.reply_datagrams(request_id, payload)
        if len(datagrams) == 1:
            try:
                self.replies.sendto(datagrams[0], socket.MSG_DONTWAIT, address)
            except OSError as exc:
                # ECONNREFUSED/ENOENT: the asking worker is gone; EAGAIN: it stopped reading.
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                    raise
                self.board.add(self.id, status.DROPPED_REPLIES, 1)
            return
        # A big reply in pieces: what does not fit the socket now waits in the outbox (in order,
        # behind any earlier big reply) and is sent as the front end reads.
        self.outbox.append((time.monotonic() + OUTBOX_TIMEOUT, address, collections.deque(datagrams)))
        self._send_outbox()

    def _send_outbox(self) -> None:
        outbox, send = self.outbox, self.replies.sendto
        now = time.monotonic()
        while outbox:
            deadline, address, datagrams = outbox[0]
            try:
                while datagrams:
                    send(datagrams[0], socket.MSG_DONTWAIT, address)
                    datagrams.popleft()
            except OSError as exc:
                if exc.errno == errno.EAGAIN and now < deadline:
                    return  # the next loop turn tries again
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                    raise
                self.board.add(self.id, status.DROPPED_REPLIES, 1)
            outbox.popleft()


class _Batch:
    """What one handle() call gathers for the status board, written to it once at the end."""

    __slots__ = ("now", "received", "applied", "reads", "writes", "waits")

    def __init__(self) -> None:
        self.now = 0
        self.received = self.applied = self.reads = self.writes = 0
        self.waits: list[tuple[int, int]] = []  # (accepted_at ns, events) per frame: the apply histogram


def _ignore(shard: Shard, head: tuple, items: msgpack.Unpacker, batch: _Batch) -> bool:
    """A kind this shard does not know is skipped, as it always was: never a reason to die."""
    return False


# One handler per message kind in protocol.KINDS; tests/test_protocol.py checks none is missing.
HANDLERS = {
    protocol.EVENTS: Shard._on_events,
    protocol.GET: Shard._on_get,
    protocol.STOP: Shard._on_stop,
    protocol.WRITE: Shard._on_write,
    protocol.GET_MANY: Shard._on_get_many,
    protocol.PART: Shard._on_part,
    protocol.CHANGES: Shard._on_changes,
    protocol.LIST: Shard._on_list,
    protocol.IMAGE_RESULT: Shard._on_image_result,
    protocol.PING: _ignore,  # the multi-host mode's wake-up of an owner (productd.cluster.owner)
}
# After a STOP: the same, but what waits for an answer (a read, a catalogue write) is answered
# UNAVAILABLE at once: the shard is about to exit. Events are still applied: they were accepted.
# A new kind that a client waits on wants its entry here.
STOPPING_HANDLERS = {
    **HANDLERS,
    protocol.GET: Shard._on_ask_stopping,
    protocol.WRITE: Shard._on_ask_stopping,
    protocol.GET_MANY: Shard._on_ask_stopping,
    protocol.CHANGES: Shard._on_ask_stopping,
    protocol.LIST: Shard._on_ask_stopping,
}
# The feed's user_id filter wants to know whose product a delete removed.
HANDLERS[protocol.WRITE] = Shard._on_write_feed


def _deadline(entry: list) -> float:
    return entry[0]
