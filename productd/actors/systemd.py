"""The sd_notify protocol: one datagram to $NOTIFY_SOCKET per state change (READY=1, STATUS=...)."""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("productd.supervisor")


def notify_systemd(message: str, address: str | None) -> None:
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
