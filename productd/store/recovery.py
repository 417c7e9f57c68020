"""A shard's recovery file: where changes go that could not be committed when the shard stopped.

A shard that is told to stop while its SQLite file refuses commits (a full disk, an I/O error)
writes every product it could not commit into this file and exits non-zero; the next start
applies the file on top of the SQLite rows, commits, and empties it. Nothing acknowledged is
lost across a stop, whatever the disk did.

A full disk has no room for a new file, so the shard reserves the room while it can: at start it
allocates the file to `reserve` bytes (posix_fallocate, or zeros where the file system cannot),
and at stop it writes inside that room, which needs no new block. Layout:

    magic "PDRECOV1" | payload length u64 | record count u64 | crc32 of payload u32 | 4 zero bytes
    payload: msgpack (product id, packed record or None for a deleted product) pairs

An all-zero header means "empty". The payload is written and synced before the header that
makes it count, so a torn write leaves an empty file or a complete one.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterable

import msgpack

from productd.store.record import upgrade

MAGIC = b"PDRECOV1"
_HEADER = struct.Struct("<8sQQI4x")
HEADER_SIZE = _HEADER.size
_EMPTY = bytes(HEADER_SIZE)


class RecoveryFileError(Exception):
    """The recovery file cannot be read; the message names it and says what to do."""


def path_for(shard_path: str) -> str:
    """`layout-1-4/shard-000.sqlite3` -> `layout-1-4/shard-000.recovery`."""
    base, _ = os.path.splitext(shard_path)
    return base + ".recovery"


def read(path: str) -> list[tuple[str, bytes]]:
    """The records a stop left in `path` (empty if none, or no file). Changes nothing."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE or header == _EMPTY:
                return []
            magic, length, count, crc = _HEADER.unpack(header)
            # A damaged length must not make us read (or allocate) past the file's end.
            fits = magic == MAGIC and length <= os.fstat(f.fileno()).st_size - HEADER_SIZE
            payload = f.read(length) if fits else b""
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RecoveryFileError(f"recovery file {path} cannot be read: {exc.strerror}") from exc
    if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
        raise RecoveryFileError(
            f"recovery file {path} is damaged (its header or checksum does not match); move it aside "
            "to start without the changes it holds, or keep it for support"
        )
    records = _records(payload)
    if len(records) != count:
        raise RecoveryFileError(f"recovery file {path} holds {len(records)} records, its header says {count}")
    return records


def _records(payload: bytes) -> list[tuple[str, bytes]]:
    unpacker = msgpack.Unpacker(raw=False, use_list=False)
    unpacker.feed(payload)
    # A record is None for a deleted product; a file from before the catalogue has 32-byte records.
    return [(product_id, upgrade(packed)) for product_id, packed in unpacker]


class RecoveryFile:
    """The shard's handle on its recovery file: reserve room, save at stop, clear after applying."""

    def __init__(self, path: str) -> None:
        self.path = path

    def reserve(self, size: int) -> None:
        """Make sure the file holds at least `size` bytes of allocated room. Raises OSError."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size == 0:
                os.pwrite(fd, _EMPTY, 0)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
                    raise
                current = os.fstat(fd).st_size
                if current < size:
                    os.pwrite(fd, bytes(size - current), current)
            os.fsync(fd)
        finally:
            os.close(fd)

    def save(self, records: Iterable[tuple[str, bytes]]) -> int:
        """Write `records` as the file's content; returns how many. Raises OSError (say, ENOSPC
        when they do not fit in the reserved room and the disk has no more)."""
        packb = msgpack.Packer(use_bin_type=True).pack
        chunks = [packb((product_id, packed)) for product_id, packed in records]
        payload = b"".join(chunks)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _write_all(fd, payload, HEADER_SIZE)
            os.fsync(fd)
            os.pwrite(fd, _HEADER.pack(MAGIC, len(payload), len(chunks), zlib.crc32(payload)), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(chunks)

    def clear(self) -> None:
        """Mark the file empty (its room stays reserved)."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.pwrite(fd, _EMPTY, 0)
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
