"""ShardClient in process, against a status board and an inbox pipe: what the HTTP side reads
through it (shard_health, shard_counters, apply_delay, stopping) and how it turns a shard's
UNAVAILABLE into ShardUnavailable."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from productd.actors import protocol, status
from productd.actors.client import ShardClient, ShardUnavailable
from productd.actors.inbox import Inbox
from productd.actors.status import StatusBoard


def test_health_counters_and_apply_delay_read_the_board():
    board = StatusBoard(2)
    inbox = [Inbox(1 << 16) for _ in range(2)]
    try:
        client = ShardClient([i.write_fd for i in inbox], board, enqueue_timeout=1.0, read_timeout=1.0)
        board.set(1, status.STATE, status.READY)
        board.beat(1)
        board.set(1, status.PID, 4242)
        board.set(1, status.WRITES_REFUSED, 1)
        board.set(1, status.PRODUCTS, 7)
        board.set(1, status.COMMITS, 3)
        board.observe_applies(1, 2_000_000, [(0, 5)])  # five events applied 2 ms after being accepted
        os.write(inbox[1].write_fd, b"x" * 10)
        assert not client.stopping
        health = client.shard_health(1)
        assert (health.state, health.alive, health.answering, health.writes_refused) == ("ready", True, True, True)
        assert (health.pid, health.products, health.inbox_bytes, health.dozing) == (4242, 7, 10, False)
        assert health.heartbeat_age < 5
        assert client.shard_counters(1).commits == 3
        delay = client.apply_delay(1)
        assert delay.count == 5 and delay.sum_seconds == pytest.approx(0.01)
        assert delay.buckets[-1] == ("+Inf", 5) and dict(delay.buckets)["0.001"] == 0
        assert dict(delay.buckets)["0.0025"] == 5
        starting = client.shard_health(0)
        assert (starting.state, starting.alive, starting.answering) == ("starting", True, False)
        board.stopping = True
        assert client.stopping
    finally:
        for i in inbox:
            for fd in (i.read_fd, i.write_fd, i.bell_read_fd, i.bell_write_fd):
                os.close(fd)


def test_a_read_answered_unavailable_raises_shard_unavailable_at_once():
    """A shard that reads a GET after its STOP answers UNAVAILABLE: the reader learns it at once."""
    board = StatusBoard(1)
    board.set(0, status.STATE, status.READY)
    inbox = Inbox(1 << 16)
    replies = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def stopping_shard() -> None:  # answers the one GET it gets as a stopping shard would
        [body] = protocol.FrameReader().feed(os.read(inbox.read_fd, 4096))
        items = protocol.body_unpacker()
        items.feed(body)
        _, reply_to, request_id, _ = items.unpack()  # protocol.Get
        replies.sendto(protocol.pack_reply(request_id, protocol.UNAVAILABLE), reply_to)

    shard = threading.Thread(target=stopping_shard, daemon=True)
    shard.start()
    client = ShardClient([inbox.write_fd], board, enqueue_timeout=5.0, read_timeout=30.0)

    async def read() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ShardUnavailable):
            await client.read("p1")
        return loop.time() - started

    try:
        assert asyncio.run(asyncio.wait_for(read(), 10)) < 5  # not the 30 s read timeout
        shard.join(5)
    finally:
        replies.close()
        for fd in (inbox.read_fd, inbox.write_fd, inbox.bell_read_fd, inbox.bell_write_fd):
            os.close(fd)

