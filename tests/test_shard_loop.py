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

from frames import write_frame

from productd.actors import protocol, status
from productd.actors.inbox import Inbox, ring
from productd.actors.shard import Shard
from productd.actors.status import StatusBoard
from productd.store.record import unpack

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
