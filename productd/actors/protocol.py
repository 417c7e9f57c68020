"""The message protocol between the front end and the shards.

An inbox is a pipe. Each message is one frame written with a single write() of at most
PIPE_BUF bytes, which Linux keeps whole and in order among any number of writers:

    magic (2 bytes) | body length (2 bytes) | crc32 of body (4 bytes) | msgpack body

The magic and checksum let a restarted shard find the next frame boundary if its predecessor
died after reading part of a frame. Bodies are a msgpack header array followed by the event
tuples packed one after another, so a bulk request can be cut into frames without packing
anything twice.

Replies travel the other way as single datagrams: msgpack [request id, payload].
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator

import msgpack

PIPE_BUF = 4096
MAGIC = 0x5044
_HEADER = struct.Struct("<HHI")
HEADER_SIZE = _HEADER.size
MAX_BODY = PIPE_BUF - HEADER_SIZE

# Message kinds: the first item of a body's header array.
EVENTS = 0  # [EVENTS, reply address or None, request id, accepted_at ns, count] + count events
GET = 1  # [GET, reply address, request id, product id]
STOP = 2  # [STOP]: drain what is before me, then exit

_packb = msgpack.Packer(use_bin_type=True).pack


def pack_event(product_id: str, price: float | None, stock: int | None, version: int | None) -> bytes:
    return _packb((product_id, price, stock, version))


def frame(body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise ValueError(f"frame body of {len(body)} bytes exceeds {MAX_BODY}")
    return _HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


def events_frames(
    packed_events: Iterable[tuple[int, bytes]],
    reply_to: bytes | None,
    request_ids: Iterator[int],
    accepted_ns: int,
) -> Iterator[tuple[list[int], int, bytes]]:
    """Cut (index, packed event) pairs into frames; yield (indexes in it, its request id, frame).

    Each frame takes the next request id, so a shard can acknowledge frames one by one.
    """
    indexes: list[int] = []
    chunks: list[bytes] = []
    size = 0
    room = MAX_BODY - 40 - (len(reply_to) if reply_to else 0)  # the header array's worst case
    for index, packed in packed_events:
        if chunks and size + len(packed) > room:
            yield _events_frame(indexes, chunks, reply_to, next(request_ids), accepted_ns)
            indexes, chunks, size = [], [], 0
        indexes.append(index)
        chunks.append(packed)
        size += len(packed)
    if chunks:
        yield _events_frame(indexes, chunks, reply_to, next(request_ids), accepted_ns)


def _events_frame(
    indexes: list[int], chunks: list[bytes], reply_to: bytes | None, request_id: int, accepted_ns: int
) -> tuple[list[int], int, bytes]:
    head = _packb((EVENTS, reply_to, request_id, accepted_ns, len(chunks)))
    return indexes, request_id, frame(head + b"".join(chunks))


def get_frame(reply_to: bytes, request_id: int, product_id: str) -> bytes:
    return frame(_packb((GET, reply_to, request_id, product_id)))


def stop_frame() -> bytes:
    return frame(_packb((STOP,)))


def pack_reply(request_id: int, payload: object) -> bytes:
    return _packb((request_id, payload))


def unpack_reply(data: bytes) -> tuple[int, object]:
    request_id, payload = msgpack.unpackb(data, raw=False)
    return request_id, payload


class FrameReader:
    """Turns the byte stream of an inbox back into message bodies.

    `skipped` counts bytes dropped while looking for a frame boundary: non-zero only after a
    predecessor died in the middle of a frame.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self._buf:  # the tail of a frame cut by the previous read comes first
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        bodies = []
        pos = 0
        end = len(data)
        while end - pos >= HEADER_SIZE:
            magic, length, crc = _HEADER.unpack_from(data, pos)
            if magic != MAGIC or length > MAX_BODY:
                pos = self._resync(data, pos)
                continue
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            body = data[pos + HEADER_SIZE : stop]
            if zlib.crc32(body) != crc:
                pos = self._resync(data, pos)
                continue
            bodies.append(body)
            pos = stop
        if pos < end:
            self._buf += data[pos:]
        return bodies

    def _resync(self, buf: bytes, pos: int) -> int:
        nxt = buf.find(_HEADER.pack(MAGIC, 0, 0)[:2], pos + 1)
        if nxt < 0:
            nxt = max(pos + 1, len(buf) - 1)
        self.skipped += nxt - pos
        return nxt


def body_unpacker() -> msgpack.Unpacker:
    """A reader of bodies: feed one, then take the header array, then each event tuple after it."""
    return msgpack.Unpacker(raw=False, use_list=False)
