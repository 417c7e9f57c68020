"""The front end's handle to the shards: route, enqueue, and ask, from a worker's event loop.

One `ShardClient` per gunicorn worker process, used only from that worker's asyncio loop. Its
reply sockets (productd.actors.replies) are watched by the loop; each request that waits for a
shard registers a future under its request id, and the reader hands each datagram to its
future. A reply whose request has already given up (timed out) finds no future: it is dropped
and counted (`late_reply`).

Inbox writes stay one non-blocking `os.write()` of at most PIPE_BUF per frame, so the kernel
keeps each frame whole among every writer; a full inbox is waited for with `add_writer` until
the deadline, never by blocking the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from productd.actors import protocol, status
from productd.actors.inbox import queued_bytes, ring
from productd.actors.replies import ReplySockets
from productd.actors.routing import shard_for
from productd.actors.status import StatusBoard

# Skipping the ring when the shard is not dozing relies on the write to the inbox and the load of
# the flag not being reordered (and likewise the shard's store of the flag and its read of the
# inbox). The pipe's lock makes that so on x86; elsewhere a read always rings, one byte more.
# Ids per GetMany: 128-character ids and a reply of full products stay a few frames each way.
GET_MANY_IDS = 100
ALWAYS_RING = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")


class ShardUnavailable(Exception):
    """The shard is down or restarting, or the service is stopping."""


class ShardTimeout(Exception):
    """The shard did not answer in time."""


class InboxFull(ShardUnavailable):
    """The shard's inbox stayed full until --enqueue-timeout: nothing of the request was applied."""


class SupervisorGone(ShardUnavailable):
    """An inbox has no reader left: the supervisor (which keeps every read end open) is dead."""


@dataclass
class Submission:
    """Which items of a request made it into their shards' inboxes."""

    accepted: int = 0
    not_accepted: list[int] = field(default_factory=list)
    unavailable_shards: list[int] = field(default_factory=list)
    full_shards: list[int] = field(default_factory=list)
    commit_errors: list[str] = field(default_factory=list)
    uncommitted: bool = False  # sync mode: some frames were not confirmed in time


PackedEvents = dict[int, list[tuple[int, bytes]]]  # shard -> [(index in the request, packed event)]


class ShardClient:
    def __init__(
        self,
        inbox_fds: list[int],
        board: StatusBoard,
        enqueue_timeout: float,
        read_timeout: float,
        wait_for_commit: bool = False,
        bell_fds: list[int] | None = None,
        late_reply: Callable[[], None] = lambda: None,
        supervisor_gone: Callable[[], None] = lambda: None,
    ) -> None:
        self.inbox_fds = inbox_fds
        self.bell_fds = bell_fds
        self.shards = len(inbox_fds)
        self.board = board
        self.enqueue_timeout = enqueue_timeout
        self.read_timeout = read_timeout
        self.wait_for_commit = wait_for_commit
        self.late_reply = late_reply
        self.on_supervisor_gone = supervisor_gone
        self.gone = False
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replies: ReplySockets | None = None
        self._writable: dict[int, list[asyncio.Future]] = {}  # inbox fd -> writers waiting for room
        os.register_at_fork(after_in_child=self._forget)

    # ---- the reply socket, on this worker's loop

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._replies = loop, ReplySockets(loop, self.late_reply)
        return loop

    def _forget(self) -> None:
        """In a forked child: the parent's sockets and loop are the parent's, never use them here."""
        self._loop = self._replies = None
        self._writable = {}

    async def _reply(self, request_id: int, future: asyncio.Future, deadline: float, loop) -> object:
        """Await the reply registered as `future`; ShardTimeout at `deadline` (loop time)."""
        timer = loop.call_at(deadline, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()
            self._replies.forget(request_id)

    # ---- writing frames

    async def _write(self, fd: int, data: bytes, deadline: float, bell: int, loop) -> bool:
        """Write one frame whole, waiting for room until `deadline` (loop time). False if none came.

        A full inbox rings `bell`: its shard may be dozing with the room the writer waits for.
        """
        rang = False
        while True:
            try:
                os.write(fd, data)
                return True
            except BlockingIOError:
                pass
            except BrokenPipeError:
                self._gone()
                raise SupervisorGone(-1) from None
            if loop.time() >= deadline:
                return False
            if bell >= 0 and not rang:
                ring(bell)
                rang = True
            room = loop.create_future()
            waiters = self._writable.get(fd)
            if waiters is None:
                # One add_writer per fd per loop: every writer waiting on this inbox shares it.
                waiters = self._writable[fd] = []
                loop.add_writer(fd, self._on_writable, fd)
            waiters.append(room)
            timer = loop.call_at(deadline, _expire, room)
            try:
                await room
            except ShardTimeout:
                return False
            finally:
                timer.cancel()

    def _on_writable(self, fd: int) -> None:
        self._loop.remove_writer(fd)
        for room in self._writable.pop(fd, ()):
            if not room.done():
                room.set_result(None)

    def _gone(self) -> None:
        if not self.gone:
            self.gone = True
            self.on_supervisor_gone()

    def supervisor_alive(self) -> bool:
        """False once an inbox has lost its last reader (POLLERR on the write end): the supervisor,
        which holds every read end, is dead, and with it every shard."""
        if self.gone:
            return False
        poller = select.poll()
        poller.register(self.inbox_fds[0], select.POLLOUT)
        for _, events in poller.poll(0):
            if events & select.POLLERR:
                self._gone()
                return False
        return True

    # ---- what the resources call

    def shard_for(self, product_id: str) -> int:
        return shard_for(product_id, self.shards)

    def writable(self, shard: int) -> bool:
        return self.board.state(shard) == status.READY and not self.board.get(shard, status.WRITES_REFUSED)

    def pack(self, events: list[tuple[str, float | None, int | None, int | None]]) -> PackedEvents:
        """Pack each event for its shard, keeping request order per shard. Pure CPU: a caller with
        a big request may run it in a thread."""
        per_shard: PackedEvents = {}
        pack = protocol.pack_event
        n = self.shards
        for index, (product_id, price, stock, version) in enumerate(events):
            per_shard.setdefault(shard_for(product_id, n), []).append((index, pack(product_id, price, stock, version)))
        return per_shard

    async def submit(self, per_shard: PackedEvents, total: int) -> Submission:
        """Put every packed event into its shard's inbox, in order per shard.

        A shard that is down, or whose inbox stays full until the deadline, takes nothing more
        of this request: the rest of its items are reported in `not_accepted`, never sent later,
        so a client that resends them keeps each product's order.
        """
        result = Submission()
        if self.board.stopping or self.gone:
            result.not_accepted = list(range(total))
            result.unavailable_shards = list(range(self.shards))
            return result
        loop = self._start()
        replies = self._replies
        deadline = loop.time() + self.enqueue_timeout
        accepted_ns = time.time_ns()
        sync = self.wait_for_commit
        waiting: dict[int, tuple[list[int], asyncio.Future]] = {}  # request id of a frame -> its indexes
        for shard, items in per_shard.items():
            if not self.writable(shard):
                result.unavailable_shards.append(shard)
                result.not_accepted.extend(index for index, _ in items)
                continue
            fd = self.inbox_fds[shard]
            bell = self.bell_fds[shard] if self.bell_fds else -1
            refused = False
            # Sync: each frame asks for its own acknowledgement, on a reply socket with room for it.
            # Frames are cut for the first address; every address has the same length, so a frame
            # bound for another one is cut again from its own items to exactly one frame.
            first = replies.next_address() if sync else None
            packed = dict(items) if sync else None
            for indexes, request_id, data in protocol.events_frames(items, first, self._ids, accepted_ns):
                if refused:
                    result.not_accepted.extend(indexes)  # never send past a refused frame
                    continue
                if sync:  # registered before the write: the ack may come at once
                    future, address = replies.expect(request_id)
                    if address != first:
                        ((_, _, data),) = protocol.events_frames(
                            [(i, packed[i]) for i in indexes], address, iter((request_id,)), accepted_ns
                        )
                try:
                    written = await self._write(fd, data, deadline, bell, loop)
                except SupervisorGone:
                    written = False
                if written:
                    result.accepted += len(indexes)
                    if sync:
                        waiting[request_id] = (indexes, future)
                else:
                    if sync:
                        replies.forget(request_id)
                    refused = True
                    (result.unavailable_shards if self.gone else result.full_shards).append(shard)
                    result.not_accepted.extend(indexes)
        if waiting:
            await self._await_commits(waiting, result, loop)
        result.not_accepted.sort()
        return result

    async def _await_commits(self, waiting: dict, result: Submission, loop) -> None:
        """Sync durability: an event counts as accepted only once its shard has committed it."""
        deadline = loop.time() + self.read_timeout
        for request_id, (indexes, future) in waiting.items():
            try:
                error = await self._reply(request_id, future, deadline, loop)
            except ShardTimeout:  # no answer in time: the client must assume not committed
                result.accepted -= len(indexes)
                result.not_accepted.extend(indexes)
                result.uncommitted = True
                continue
            if error is not None:
                result.accepted -= len(indexes)
                result.not_accepted.extend(indexes)
                result.commit_errors.append(error)

    async def read(self, product_id: str) -> bytes | None:
        """The product's packed record (see productd.store.record) as its shard has it now,
        behind every event already in its inbox; None if it has none.

        `ask` specialised for the hottest path: one frame, no Parts, no callback to build it.
        """
        shard = shard_for(product_id, self.shards)
        board = self.board
        if board.state(shard) != status.READY or self.gone:
            raise ShardUnavailable(shard)
        loop = self._start()
        replies = self._replies
        request_id = next(self._ids)
        deadline = loop.time() + self.read_timeout
        bell = self.bell_fds[shard] if self.bell_fds else -1
        future, address = replies.expect(request_id)
        frame = protocol.get_frame(address, request_id, product_id)
        try:
            written = await self._write(self.inbox_fds[shard], frame, deadline, bell, loop)
        except SupervisorGone:
            replies.forget(request_id)
            raise ShardUnavailable(shard) from None
        if not written:
            replies.forget(request_id)
            raise ShardTimeout(shard)
        if bell >= 0 and (ALWAYS_RING or board.get(shard, status.DOZING)):
            ring(bell)
        try:
            payload = await self._reply(request_id, future, deadline, loop)
        except ShardTimeout:
            raise ShardTimeout(shard) from None
        if payload == protocol.UNAVAILABLE:  # it read our GET after its STOP
            raise ShardUnavailable(shard)
        return payload

    async def ask(
        self, shard: int, pack: Callable[[bytes, int], bytes], *, write: bool = False, timeout: float | None = None
    ) -> object:
        """Send one message to `shard` and await its answer: `pack(reply address, request id)`
        builds the body (cut into Parts when it does not fit one frame). The message travels
        behind everything already in the shard's inbox.

        Raises ShardUnavailable (the shard is down, stopping, or with `write`, refusing writes),
        InboxFull (no room until --enqueue-timeout: nothing was applied) or ShardTimeout (no
        answer within --read-timeout: a write may or may not have been applied). `timeout`: wait
        that long for the answer instead of --read-timeout (the change feed's parked requests).
        """
        if self.gone or not (self.writable(shard) if write else self.board.state(shard) == status.READY):
            raise ShardUnavailable(shard)
        loop = self._start()
        replies = self._replies
        request_id = next(self._ids)
        future, address = replies.expect(request_id)
        now = loop.time()
        enqueue_deadline = now + self.enqueue_timeout
        bell = self.bell_fds[shard] if self.bell_fds else -1
        fd = self.inbox_fds[shard]
        try:
            for frame in protocol.message_frames(pack(address, request_id), address, request_id):
                if not await self._write(fd, frame, enqueue_deadline, bell, loop):
                    raise InboxFull(shard)
        except SupervisorGone:
            replies.forget(request_id)
            raise ShardUnavailable(shard) from None
        except BaseException:
            replies.forget(request_id)
            raise
        if bell >= 0 and (ALWAYS_RING or self.board.get(shard, status.DOZING)):
            ring(bell)
        try:
            wait = self.read_timeout if timeout is None else timeout
            payload = await self._reply(request_id, future, now + wait, loop)
        except ShardTimeout:
            raise ShardTimeout(shard) from None
        if payload == protocol.UNAVAILABLE:  # it read the message after its STOP
            raise ShardUnavailable(shard)
        return payload

    async def write(
        self, product_id: str, op: int, fields: dict | None, if_match=None, if_none_match=None
    ) -> tuple[int, object]:
        """A catalogue write through the product's shard: (outcome, value) as in productd.store.catalogue."""
        outcome, value = await self.ask(
            shard_for(product_id, self.shards),
            lambda address, request_id: protocol.Write.pack(
                address, request_id, op, product_id, fields, if_match, if_none_match
            ),
            write=True,
        )
        return outcome, value

    async def read_many(self, product_ids: list[str]) -> dict[str, bytes | None]:
        """Several products at once: one GetMany per shard involved (more where the ids do not fit
        one frame), all in flight together. Every id maps to its packed record or None."""
        per_shard: dict[int, list[str]] = {}
        for product_id in product_ids:
            per_shard.setdefault(shard_for(product_id, self.shards), []).append(product_id)
        asks = []
        for shard, ids in per_shard.items():
            for start in range(0, len(ids), GET_MANY_IDS):
                chunk = ids[start:start + GET_MANY_IDS]
                asks.append((chunk, self.ask(
                    shard, lambda address, request_id, chunk=chunk: protocol.GetMany.pack(address, request_id, chunk)
                )))
        answers = await asyncio.gather(*(ask for _, ask in asks))
        found: dict[str, bytes | None] = {}
        for (chunk, _), records in zip(asks, answers, strict=True):
            found.update(zip(chunk, records, strict=True))
        return found

    def inbox_bytes(self, shard: int) -> int:
        return queued_bytes(self.inbox_fds[shard])

    # ---- what the HTTP side reads of the shards' health (/ready, /metrics): from here, not the board

    cluster = False  # productd.cluster.client.ClusterClient: the multi-host mode

    async def refresh(self) -> None:
        """Bring the health figures up to date before /readyz or /metrics reads them: nothing to
        do here, the status board is live."""

    @property
    def stopping(self) -> bool:
        """True once the service has begun to stop: no new events are taken."""
        return self.board.stopping

    def shard_health(self, shard: int) -> ShardHealth:
        """The shard as the status board has it now; each field is read once, a moment apart."""
        board = self.board
        state = board.state(shard)
        return ShardHealth(
            state=status.STATE_NAMES.get(state, "unknown"),
            alive=state in (status.STARTING, status.READY),
            answering=status.answering(board, shard),
            writes_refused=bool(board.get(shard, status.WRITES_REFUSED)),
            pid=board.get(shard, status.PID),
            dozing=bool(board.get(shard, status.DOZING)),
            restarts=board.get(shard, status.RESTARTS),
            state_lost=board.get(shard, status.STATE_LOST),
            products=board.get(shard, status.PRODUCTS),
            inbox_bytes=self.inbox_bytes(shard),
            heartbeat_age=board.heartbeat_age(shard),
        )

    def shard_counters(self, shard: int) -> ShardCounters:
        """The shard's running totals, for /metrics."""
        get = self.board.get
        return ShardCounters(*(get(shard, field) for field in _COUNTER_FIELDS))

    def apply_delay(self, shard: int) -> ApplyDelay:
        """The shard's histogram of the time from accepting an event to applying it."""
        get = self.board.get
        cumulative, buckets = 0, []
        for i, bound in enumerate((*status.APPLY_BUCKETS, "+Inf")):
            cumulative += get(shard, status.APPLY_HIST + i)
            buckets.append((str(bound), cumulative))
        return ApplyDelay(buckets, get(shard, status.APPLY_SUM_US) / 1e6, get(shard, status.APPLY_COUNT))


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(ShardTimeout(-1))


class ShardHealth(NamedTuple):
    """One shard's health as ShardClient.shard_health reads it from the status board."""

    state: str  # "starting", "ready", "dead" (being restarted) or "stopped"
    alive: bool  # starting or ready: a process is there
    answering: bool  # ready, and went round its loop within the last few seconds
    writes_refused: bool  # it cannot commit: writes get 503, reads are served
    pid: int
    dozing: bool
    restarts: int
    state_lost: int  # restarts that lost its products (memory-only mode)
    products: int
    inbox_bytes: int  # waiting in its inbox
    heartbeat_age: float  # seconds since it last went round its loop


class ShardCounters(NamedTuple):
    """One shard's running totals (ShardClient.shard_counters)."""

    received: int  # events read from the inbox
    applied: int
    stale: int
    reads: int
    commits: int
    dropped_replies: int
    skipped_bytes: int
    image_results_dropped: int  # results for images the product no longer shows


_COUNTER_FIELDS = (status.RECEIVED, status.APPLIED, status.STALE, status.READS, status.COMMITS,
                   status.DROPPED_REPLIES, status.SKIPPED_BYTES,
                   status.IMAGE_RESULTS_DROPPED)  # in ShardCounters' order


class ApplyDelay(NamedTuple):
    """One shard's apply-delay histogram (ShardClient.apply_delay)."""

    buckets: list[tuple[str, int]]  # (upper bound in seconds, or "+Inf"; events up to it, cumulative)
    sum_seconds: float
    count: int
