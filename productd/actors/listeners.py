"""The listening sockets: bound by the supervisor before anything forks, one per gunicorn worker."""

from __future__ import annotations

import socket


class ListenError(Exception):
    """The address cannot be listened on; the message says which and why."""


def parse_bind(bind: str) -> tuple[int, tuple]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ListenError(f"--bind {bind!r}: expected HOST:PORT, for example 127.0.0.1:8080 or [::1]:8080")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


def listen(bind: str, count: int) -> list[socket.socket]:
    """`count` listening sockets on one address, one per gunicorn worker.

    With SO_REUSEPORT the kernel spreads new connections evenly over the sockets. Workers that
    share one socket race for each connection instead, and under keep-alive one worker can end up
    holding all of them while the other idles (measured: half the throughput).
    """
    family, address = parse_bind(bind)
    # A plain bind first: it fails if anything holds the port, including another productd's
    # SO_REUSEPORT group, which a reuse-port bind would silently join and share traffic with.
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        if address[1] == 0:
            address = probe.getsockname()[:2]
    except OSError as exc:
        raise ListenError(f"cannot listen on {bind}: {exc.strerror}") from exc
    finally:
        probe.close()
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(2048)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {bind}: {exc.strerror}") from exc
    return sockets
