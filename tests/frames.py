"""Frames into a shard's inbox without a ShardClient: how tests (and bench/test_actors.py, which
loads this file by path) drive a shard loop directly, and a shard in process whose replies are
recorded."""

from __future__ import annotations

import os
import select
import time

from productd.actors.inbox import ring
from productd.actors.shard import Shard
from productd.actors.status import StatusBoard


def write_frame(fd: int, data: bytes, deadline: float, bell: int = -1) -> bool:
    """Write one frame whole, waiting for room until `deadline` (time.monotonic()). False if none came.

    A full inbox rings `bell`: its shard may be dozing with the room the writer waits for.
    """
    poller = None
    while True:
        try:
            os.write(fd, data)
            return True
        except BlockingIOError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if poller is None:
            if bell >= 0:
                ring(bell)
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        poller.poll(max(1, int(remaining * 1000)))


class RecordingShard(Shard):
    """Shard 0 in process, with no inbox: `handle()` it bodies; its replies land in `sent` as
    (address, request id, payload) instead of going out. Keyword arguments go to Shard."""

    def __init__(self, **kw) -> None:
        super().__init__(0, -1, StatusBoard(1), **kw)
        self.sent: list[tuple[bytes, int, object]] = []

    def reply(self, address: bytes, request_id: int, payload: object) -> None:
        self.sent.append((address, request_id, payload))
