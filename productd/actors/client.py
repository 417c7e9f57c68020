"""The front end's handle to the shards: route, enqueue, and ask.

One `ShardClient` per gunicorn worker process. Each handler thread gets its own reply socket
(an autobound abstract Unix datagram socket, so nothing is left on disk) the first time it
reads, and waits on it itself: handing replies from a reader thread to waiters costs more
context switches than it saves.
"""

from __future__ import annotations

import itertools
import os
import platform
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from productd.actors import protocol, status
from productd.actors.inbox import queued_bytes, ring, write_frame
from productd.actors.routing import shard_for
from productd.actors.status import StatusBoard

# Skipping the ring when the shard is not dozing relies on the write to the inbox and the load of
# the flag not being reordered (and likewise the shard's store of the flag and its read of the
# inbox). The pipe's lock makes that so on x86; elsewhere a read always rings, one byte more.
ALWAYS_RING = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")


class ShardUnavailable(Exception):
    """The shard is down or restarting, or the service is stopping."""


class ShardTimeout(Exception):
    """The shard did not answer in time."""


@dataclass
class Submission:
    """Which items of a request made it into their shards' inboxes."""

    accepted: int = 0
    not_accepted: list[int] = field(default_factory=list)
    unavailable_shards: list[int] = field(default_factory=list)
    full_shards: list[int] = field(default_factory=list)
    commit_errors: list[str] = field(default_factory=list)
    uncommitted: bool = False  # sync mode: some frames were not confirmed in time


class ShardClient:
    def __init__(
        self,
        inbox_fds: list[int],
        board: StatusBoard,
        enqueue_timeout: float,
        read_timeout: float,
        wait_for_commit: bool = False,
        bell_fds: list[int] | None = None,
    ) -> None:
        self.inbox_fds = inbox_fds
        self.bell_fds = bell_fds
        self.shards = len(inbox_fds)
        self.board = board
        self.enqueue_timeout = enqueue_timeout
        self.read_timeout = read_timeout
        self.wait_for_commit = wait_for_commit
        self._local = threading.local()
        self._ids = itertools.count(1)
        os.register_at_fork(after_in_child=self._forget_reply_sockets)

    def shard_for(self, product_id: str) -> int:
        return shard_for(product_id, self.shards)

    def writable(self, shard: int) -> bool:
        return self.board.state(shard) == status.READY and not self.board.get(shard, status.WRITES_REFUSED)

    def submit(self, events: list[tuple[str, float | None, int | None, int | None]]) -> Submission:
        """Put every event into its shard's inbox, in order per shard.

        A shard that is down, or whose inbox stays full until the deadline, takes nothing more
        of this request: the rest of its items are reported in `not_accepted`, never sent later,
        so a client that resends them keeps each product's order.
        """
        result = Submission()
        if self.board.stopping:
            result.not_accepted = list(range(len(events)))
            result.unavailable_shards = list(range(self.shards))
            return result
        per_shard: dict[int, list[tuple[int, bytes]]] = {}
        pack = protocol.pack_event
        n = self.shards
        for index, (product_id, price, stock, version) in enumerate(events):
            per_shard.setdefault(shard_for(product_id, n), []).append(
                (index, pack(product_id, price, stock, version))
            )
        deadline = time.monotonic() + self.enqueue_timeout
        accepted_ns = time.time_ns()
        reply_to = self._reply_socket()[1] if self.wait_for_commit else None
        waiting: dict[int, list[int]] = {}  # request id of a frame -> its indexes
        for shard, items in per_shard.items():
            if not self.writable(shard):
                result.unavailable_shards.append(shard)
                result.not_accepted.extend(index for index, _ in items)
                continue
            fd = self.inbox_fds[shard]
            bell = self.bell_fds[shard] if self.bell_fds else -1
            for indexes, request_id, data in protocol.events_frames(items, reply_to, self._ids, accepted_ns):
                if result.full_shards and result.full_shards[-1] == shard:
                    result.not_accepted.extend(indexes)  # never send past a refused frame
                elif write_frame(fd, data, deadline, bell):
                    result.accepted += len(indexes)
                    if reply_to is not None:
                        waiting[request_id] = indexes
                else:
                    result.full_shards.append(shard)
                    result.not_accepted.extend(indexes)
        if waiting:
            self._await_commits(waiting, result)
        result.not_accepted.sort()
        return result

    def _await_commits(self, waiting: dict[int, list[int]], result: Submission) -> None:
        """Sync durability: an event counts as accepted only once its shard has committed it."""
        for request_id, error in self._replies(time.monotonic() + self.read_timeout):
            indexes = waiting.pop(request_id, None)
            if indexes is not None and error is not None:
                result.accepted -= len(indexes)
                result.not_accepted.extend(indexes)
                result.commit_errors.append(error)
            if not waiting:
                break
        for indexes in waiting.values():  # no answer in time: the client must assume not committed
            result.accepted -= len(indexes)
            result.not_accepted.extend(indexes)
            result.uncommitted = True

    def read(self, product_id: str) -> bytes | None:
        """The product's packed record (see productd.store.record) as its shard has it now,
        behind every event already in its inbox; None if it has none."""
        shard = shard_for(product_id, self.shards)
        board = self.board
        if board.state(shard) != status.READY:
            raise ShardUnavailable(shard)
        address = self._reply_socket()[1]
        request_id = next(self._ids)
        deadline = time.monotonic() + self.read_timeout
        bell = self.bell_fds[shard] if self.bell_fds else -1
        if not write_frame(self.inbox_fds[shard], protocol.get_frame(address, request_id, product_id), deadline, bell):
            raise ShardTimeout(shard)
        if bell >= 0 and (ALWAYS_RING or board.get(shard, status.DOZING)):
            ring(bell)
        for got_id, payload in self._replies(deadline):
            if got_id == request_id:  # anything else is a late answer to a read that timed out
                return payload
        raise ShardTimeout(shard)

    def _replies(self, deadline: float) -> Iterator[tuple[int, object]]:
        """Replies to this thread until `deadline`.

        The socket carries SO_RCVTIMEO = read timeout, so each wait is one recv() system call
        rather than poll() and recv(); only a late reply to an earlier read makes the wait go on,
        by at most one more read timeout.
        """
        sock = self._reply_socket()[0]
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except BlockingIOError:  # SO_RCVTIMEO expired
                return
            yield protocol.unpack_reply(data)

    def inbox_bytes(self, shard: int) -> int:
        return queued_bytes(self.inbox_fds[shard])

    def _reply_socket(self) -> tuple[socket.socket, bytes]:
        try:
            return self._local.socket
        except AttributeError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("")  # Linux autobind: a unique abstract address
        seconds = int(self.read_timeout)
        micros = int((self.read_timeout - seconds) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
        self._local.socket = sock, sock.getsockname()
        return self._local.socket

    def _forget_reply_sockets(self) -> None:
        """In a forked child: the parent's reply sockets are the parent's, never read them here."""
        self._local = threading.local()
