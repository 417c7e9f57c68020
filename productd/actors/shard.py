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

from productd.actors import protocol, status
from productd.actors.status import StatusBoard
from productd.store.memory import ShardStore

log = logging.getLogger("productd.shard")

READ_CHUNK = 1 << 16
IDLE_TICK_MS = 1000  # heartbeat period of an idle shard


class Shard:
    def __init__(self, shard_id: int, inbox_fd: int, board: StatusBoard) -> None:
        self.id = shard_id
        self.inbox_fd = inbox_fd
        self.board = board
        self.store = ShardStore()
        self.replies = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader = protocol.FrameReader()
        self.dropped_replies = 0

    def run(self) -> int:
        """Serve until a STOP message; returns the process exit code."""
        board, sid = self.board, self.id
        board.set(sid, status.PRODUCTS, len(self.store))
        board.beat(sid)
        board.set(sid, status.STATE, status.READY)
        log.info("shard %d ready with %d products", sid, len(self.store))
        poller = select.poll()
        poller.register(self.inbox_fd, select.POLLIN)
        while True:
            board.beat(sid)
            if not poller.poll(IDLE_TICK_MS):
                continue
            data = os.read(self.inbox_fd, READ_CHUNK)
            if not data:  # every write end closed: nothing more can come
                return 0
            if self.handle(self.reader.feed(data)):
                log.info("shard %d drained its inbox and stops with %d products", sid, len(self.store))
                return 0

    def handle(self, bodies: list[bytes]) -> bool:
        """Apply a batch of messages in order; True when one of them was STOP."""
        store, board, sid = self.store, self.board, self.id
        received = applied = reads = 0
        stop = False
        for body in bodies:
            items = protocol.unpack_body(body)
            head = next(items)
            kind = head[0]
            if kind == protocol.EVENTS:
                now = time.time_ns()
                for product_id, price, stock, version in items:
                    received += 1
                    if store.apply(product_id, price, stock, version, now):
                        applied += 1
            elif kind == protocol.GET:
                reads += 1
                self.reply(head[1], head[2], store.get_packed(head[3]))
            elif kind == protocol.STOP:
                stop = True
                break
        board.add(sid, status.RECEIVED, received)
        board.add(sid, status.APPLIED, applied)
        board.add(sid, status.STALE, received - applied)
        board.add(sid, status.READS, reads)
        board.set(sid, status.PRODUCTS, len(store))
        if self.reader.skipped:
            board.add(sid, status.SKIPPED_BYTES, self.reader.skipped)
            log.warning("shard %d skipped %d bytes of a frame its predecessor had half read",
                        sid, self.reader.skipped)
            self.reader.skipped = 0
        return stop

    def reply(self, address: bytes, request_id: int, payload: object) -> None:
        try:
            self.replies.sendto(protocol.pack_reply(request_id, payload), socket.MSG_DONTWAIT, address)
        except OSError as exc:
            # ECONNREFUSED/ENOENT: the asking thread is gone; EAGAIN: it stopped reading.
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                raise
            self.dropped_replies += 1
