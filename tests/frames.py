"""Frames into a shard's inbox without a ShardClient: how tests (and bench/test_actors.py, which
loads this file by path) drive a shard loop directly."""

from __future__ import annotations

import os
import select
import time

from productd.actors.inbox import ring


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
