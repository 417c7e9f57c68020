"""The shard loop's doze, in process: a real Shard.run on real pipes and a real reply socket, in a thread.

The end-to-end behaviour is in test_apply_delay.py. This one hits the one instant a running service
cannot be made to hit on purpose: a read queued after the shard's last look at its inbox but before
its DOZING flag went up. That reader saw the flag down and did not ring, so the shard must look at
its inbox once more after raising the flag, or the read waits out the whole apply delay.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time

import pytest
from frames import write_frame

from productd.actors import protocol, status
from productd.actors import shard as shard_module
from productd.actors.inbox import Inbox, ring
from productd.actors.shard import Shard
from productd.actors.status import StatusBoard
from productd.store.record import unpack
from productd.store.sqlite import ShardFile

APPLY_DELAY = 60.0  # far longer than the reply deadline below: an answer in time was not the delay ending
REPLY_DEADLINE = 10.0


def _event_frame(product_id: str, price: float) -> bytes:
    packed = [(0, protocol.pack_event(product_id, price, None, None))]
    [(_, _, frame)] = protocol.events_frames(packed, None, itertools.count(1), time.time_ns())
    return frame


def test_a_read_queued_just_before_the_flag_goes_up_is_answered_at_once():
    inbox = Inbox(1 << 16)
    board = StatusBoard(1)
    shard = Shard(0, inbox.read_fd, board, bell_fd=inbox.bell_read_fd, apply_delay=APPLY_DELAY)
    replies = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    replies.bind("")
    replies.settimeout(REPLY_DEADLINE)

    raised, set_field = [], board.set

    def set_and_slip_a_read_in(shard_id: int, field: int, value: int) -> None:
        if field == status.DOZING and value == 1 and not raised:
            # A reader queues its GET now. The flag is still down, so it does not ring.
            frame = protocol.get_frame(replies.getsockname(), 7, "p1")
            assert write_frame(inbox.write_fd, frame, time.monotonic() + 5)
            raised.append(True)
        set_field(shard_id, field, value)

    board.set = set_and_slip_a_read_in
    loop = threading.Thread(target=shard.run, daemon=True)
    loop.start()
    try:
        # Only an event: having read it, the shard raises its flag to doze.
        assert write_frame(inbox.write_fd, _event_frame("p1", 2.5), time.monotonic() + 5)
        request_id, payload = protocol.unpack_reply(replies.recv(65536))  # socket.timeout fails the test
        assert raised, "the shard never started to doze"
        assert request_id == 7
        assert unpack(payload).price == 2.5
    finally:
        write_frame(inbox.write_fd, protocol.stop_frame(), time.monotonic() + 5)
        ring(inbox.bell_write_fd)
        loop.join(REPLY_DEADLINE)
    assert not loop.is_alive(), "the shard did not stop on its STOP frame"
    replies.close()
    shard.replies.close()
    for fd in (inbox.read_fd, inbox.write_fd, inbox.bell_read_fd, inbox.bell_write_fd):
        os.close(fd)


@pytest.mark.parametrize("first_read", ["whole", "up_to_stop"])
def test_what_is_queued_behind_stop_is_applied_and_a_read_is_told_unavailable_at_once(tmp_path, monkeypatch,
                                                                                       first_read):
    """Events behind STOP were accepted (202) and are applied and committed; a GET behind it gets
    UNAVAILABLE at once instead of no answer (its reader would wait out --read-timeout). Both
    when the shard reads them with its STOP and when they come in a later read (`up_to_stop`:
    the shard's first read ends at the STOP frame)."""
    path = str(tmp_path / "shard-0.sqlite")
    inbox = Inbox(1 << 16)
    board = StatusBoard(1)
    replies = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    replies.bind("")
    replies.settimeout(REPLY_DEADLINE)
    head = _event_frame("before", 1.5) + protocol.stop_frame()
    behind = _event_frame("behind", 2.5) + protocol.get_frame(replies.getsockname(), 8, "before")
    if first_read == "up_to_stop":
        monkeypatch.setattr(shard_module, "READ_CHUNK", len(head))
    os.write(inbox.write_fd, head + behind)  # all queued before the shard first looks
    shard = Shard(0, inbox.read_fd, board, path=path, durability="batch", commit_interval=60.0)
    codes: list[int] = []
    loop = threading.Thread(target=lambda: codes.append(shard.run()), daemon=True)
    started = time.monotonic()
    loop.start()
    try:
        request_id, payload = protocol.unpack_reply(replies.recv(65536))  # socket.timeout fails the test
        assert time.monotonic() - started < REPLY_DEADLINE / 2
        assert (request_id, payload) == (8, protocol.UNAVAILABLE)
        loop.join(REPLY_DEADLINE)
        assert not loop.is_alive(), "the shard did not stop on its STOP frame"
        assert codes == [0]
        assert board.get(0, status.RECEIVED) == 2 and board.get(0, status.READS) == 0
        committed = ShardFile(path, sync=False)
        try:
            assert {product_id: unpack(packed).price for product_id, packed in committed.rows()} == {
                "before": 1.5, "behind": 2.5}
        finally:
            committed.close()
    finally:
        replies.close()
        shard.replies.close()
        for fd in (inbox.read_fd, inbox.write_fd, inbox.bell_read_fd, inbox.bell_write_fd):
            os.close(fd)
