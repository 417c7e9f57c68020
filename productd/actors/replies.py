"""The reply sockets of one front-end worker, read by its event loop.

Shards answer reads (and sync-durability commits) with one datagram to the address the request
frame carried, without blocking: a datagram that cannot be queued at once is dropped (and
counted by the shard). Linux queues at most net.unix.max_dgram_qlen datagrams (10 by default)
on a Unix datagram socket, whatever its buffer size; measured: at 32 connections over two
workers, one socket per worker dropped about one GET reply in a thousand, each a 504 after the
read timeout. So a socket is handed to at most that many requests at a time, and a worker with
more requests waiting opens more sockets (autobound abstract addresses: nothing on disk).

Every socket is watched with `loop.add_reader`; a reply is matched to its request's future by
request id. A reply whose request has given up finds no future: it is dropped and counted.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from productd.actors import protocol

MAX_REPLY = protocol.MAX_REPLY
DEFAULT_QLEN = 10


def dgram_queue_length() -> int:
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen", encoding="ascii") as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return DEFAULT_QLEN


class ReplySockets:
    def __init__(self, loop: asyncio.AbstractEventLoop, late_reply: Callable[[], None]) -> None:
        self.loop = loop
        self.late_reply = late_reply
        # A socket takes one datagram more than the sysctl says (the kernel checks "> qlen"); one
        # less than that leaves room for a late reply to a request that already gave up.
        self.capacity = dgram_queue_length()
        self.sockets: list[socket.socket] = []
        self.addresses: list[bytes] = []
        self.in_use: list[int] = []
        self.with_room: list[int] = []  # indexes of sockets below capacity
        self.waiting: dict[int, tuple[asyncio.Future, int]] = {}  # request id -> (its reply, socket index)
        self.pieces: dict[int, list[bytes]] = {}  # request id -> the pieces of a big reply so far

    def expect(self, request_id: int) -> tuple[asyncio.Future, bytes]:
        """A future for the reply to `request_id` and the address to have it sent to."""
        index = self._take()
        future = self.loop.create_future()
        self.waiting[request_id] = (future, index)
        return future, self.addresses[index]

    def next_address(self) -> bytes:
        """The address the next `expect` will most likely hand out (every address has one length)."""
        if not self.with_room:
            self._give(self._open())
        return self.addresses[self.with_room[-1]]

    def forget(self, request_id: int) -> None:
        """The request no longer waits (answered, timed out or never sent)."""
        entry = self.waiting.pop(request_id, None)
        if entry is not None:
            self._give(entry[1])
        self.pieces.pop(request_id, None)

    def close(self) -> None:
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()

    def _take(self) -> int:
        with_room, in_use = self.with_room, self.in_use
        if with_room:
            index = with_room[-1]
            in_use[index] += 1
            if in_use[index] >= self.capacity:
                with_room.pop()
            return index
        return self._open()

    def _give(self, index: int) -> None:
        self.in_use[index] -= 1
        if self.in_use[index] == self.capacity - 1:
            self.with_room.append(index)

    def _open(self) -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("")  # Linux autobind: a unique abstract address
        sock.setblocking(False)
        index = len(self.sockets)
        self.sockets.append(sock)
        self.addresses.append(sock.getsockname())
        self.in_use.append(1)
        if self.capacity > 1:
            self.with_room.append(index)
        self.loop.add_reader(sock.fileno(), self._on_replies, sock)
        return index

    def _on_replies(self, sock: socket.socket) -> None:
        recv, waiting, unpack = sock.recv, self.waiting, protocol.unpack_reply
        while True:
            try:
                data = recv(MAX_REPLY)
            except (BlockingIOError, InterruptedError):
                return
            reply = unpack(data)
            request_id, payload = reply[0], reply[1]
            if len(reply) == 3:  # a piece of a big reply: (request id, chunk, pieces left)
                if request_id not in waiting:
                    self.late_reply()
                    continue
                pieces = self.pieces.setdefault(request_id, [])
                pieces.append(payload)
                if reply[2]:
                    continue
                del self.pieces[request_id]
                payload = protocol.unpack_payload(pieces)
            entry = waiting.pop(request_id, None)
            if entry is None:
                self.late_reply()  # its request timed out (504) or went away: nobody to give it to
                continue
            future, index = entry
            self._give(index)
            if not future.done():
                future.set_result(payload)
