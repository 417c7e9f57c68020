"""Shard inboxes: one pipe per shard, many writers, one reader, and a doorbell beside it.

Writes are non-blocking and retried until a deadline, so a full inbox becomes a refusal the
caller can turn into a 503 rather than a stuck thread. Nothing is buffered on the writer's side.

The doorbell is a second, tiny pipe. A shard that is letting events gather (see
productd.actors.shard, "dozing") sleeps on its doorbell rather than on its inbox, so a write
does not wake it; a reader who needs an answer now rings the bell after queuing its frame.
The bell carries no data: the frame itself still travels in the inbox, behind every event.
"""

from __future__ import annotations

import fcntl
import os
import termios
from array import array


class Inbox:
    """Both ends of one shard's pipe, as created by the supervisor before anything forks."""

    def __init__(self, capacity: int) -> None:
        self.read_fd, self.write_fd = os.pipe()
        try:
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, capacity)
        except OSError as exc:
            os.close(self.read_fd)
            os.close(self.write_fd)
            raise OSError(
                exc.errno,
                f"cannot size an inbox pipe to {capacity} bytes ({exc.strerror}); "
                "the limit is /proc/sys/fs/pipe-max-size",
            ) from exc
        os.set_blocking(self.write_fd, False)
        self.capacity = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)
        self.bell_read_fd, self.bell_write_fd = os.pipe()
        os.set_blocking(self.bell_read_fd, False)
        os.set_blocking(self.bell_write_fd, False)

    def read_fds(self) -> tuple[int, int]:
        return self.read_fd, self.bell_read_fd


def ring(bell_fd: int) -> None:
    """Wake the shard behind this doorbell. A full bell is already ringing."""
    try:
        os.write(bell_fd, b"!")
    except BlockingIOError:
        pass


def silence(bell_fd: int) -> bool:
    """Empty a doorbell (shard side); True if it had rung."""
    rung = False
    try:
        while os.read(bell_fd, 4096):
            rung = True
    except BlockingIOError:
        pass
    return rung


def queued_bytes(fd: int) -> int:
    """Bytes waiting in the pipe behind either of its ends."""
    buf = array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]
