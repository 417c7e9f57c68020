"""How an image worker tells a product's shard that a job ended: one protocol.ImageResult frame
into the shard's inbox, the way the front end writes (one write of at most PIPE_BUF bytes, kept
whole among any number of writers), then its doorbell (it may be dozing).

The write is non-blocking and retried until a deadline, like the supervisor's STOP: a full inbox
means a busy shard, and the worker must not hang on it. When the inbox stays full, `send`
answers False and the worker keeps the job_products row, to send again later (at least once;
applying a result twice changes nothing).
"""

from __future__ import annotations

import os
import select
import time

from productd.actors import protocol
from productd.actors.inbox import ring
from productd.actors.routing import shard_for

MAX_REASON = 64  # a failed result's reason is one of fetch's or render's short names; bounded for the frame
SEND_DEADLINE = 2.0  # seconds a full inbox is waited for before the result is left for a re-send


class ResultSender:
    def __init__(self, inbox_fds: list[int], bell_fds: list[int], shards: int,
                 deadline: float = SEND_DEADLINE) -> None:
        self.inbox_fds = inbox_fds
        self.bell_fds = bell_fds
        self.shards = shards
        self.deadline = deadline

    def send(self, product_id: str, url: str, result: tuple) -> bool:
        if result and result[0] != "done":
            result = (result[0], str(result[1])[:MAX_REASON])
        shard = shard_for(product_id, self.shards)
        data = protocol.frame(protocol.ImageResult.pack(product_id, url, result))
        fd, bell = self.inbox_fds[shard], self.bell_fds[shard]
        end = time.monotonic() + self.deadline
        while True:
            try:
                os.write(fd, data)  # the inbox's write end is non-blocking (actors.inbox.Inbox)
                break
            except BlockingIOError:
                pass
            left = end - time.monotonic()
            if left <= 0:
                return False
            ring(bell)  # a dozing shard holds the room we wait for
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(max(1, int(min(left, 0.05) * 1000)))
        ring(bell)
        return True
