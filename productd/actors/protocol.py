"""The message protocol between the front end and the shards.

An inbox is a pipe. Each message is one frame written with a single write() of at most
PIPE_BUF bytes, which Linux keeps whole and in order among any number of writers:

    magic (2 bytes) | body length (2 bytes) | crc32 of body (4 bytes) | msgpack body

The magic and checksum let a restarted shard find the next frame boundary if its predecessor
died after reading part of a frame. Bodies are a msgpack header array followed by the event
tuples packed one after another, so a bulk request can be cut into frames without packing
anything twice. Each message kind is one NamedTuple below (`Events`, `Get`, `Stop`): its
header fields, its code and its `pack`; the shard has one handler per kind (shard.HANDLERS).

Replies travel the other way as single datagrams: msgpack [request id, payload].
A payload is bytes, None, a str or a list, or UNAVAILABLE (below), never any other int.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import msgpack

PIPE_BUF = 4096
MAGIC = 0x5044
_HEADER = struct.Struct("<HHI")
HEADER_SIZE = _HEADER.size
MAX_BODY = PIPE_BUF - HEADER_SIZE

_packb = msgpack.Packer(use_bin_type=True).pack

# The message kinds by code, the first item of a body's header array: see `message`.
KINDS: dict[int, type] = {}

# The codes, by the names the front end and older tests use. 6 and 7 are the listing's and the
# change feed's.
EVENTS, GET, STOP, WRITE, GET_MANY, PART = 0, 1, 2, 3, 4, 5
CHANGES = 7  # the change feed's kind: Changes

# The reply payload of a read that reached its shard after STOP: the shard is stopping and will
# not answer it; the client raises ShardUnavailable (503 with Retry-After) at once rather than
# have the reader wait out --read-timeout.
UNAVAILABLE = -1

_new_tuple = tuple.__new__


def message(cls):
    """Register a message kind: a NamedTuple of its header fields, with its code as KIND.

    A header travels as the plain tuple (KIND, *fields), which `pack` builds itself: building
    and packing the NamedTuple instead costs three times as much, on the path of every GET and
    POST. `unpack(head)` turns a header read from a body back into the NamedTuple; the shard's
    handlers name the header's items in the same order instead, for the same reason. The round
    trips in tests/test_protocol.py hold each `pack` and each handler to the fields' order.
    """
    if cls.KIND in KINDS:
        raise ValueError(f"message kind {cls.KIND} is taken by {KINDS[cls.KIND].__name__}")
    KINDS[cls.KIND] = cls

    def unpack(head: tuple):
        # tuple.__new__ rather than _make: half the cost, and a body is whole and CRC-checked.
        return _new_tuple(cls, head[1:])

    cls.unpack = staticmethod(unpack)
    return cls


def unpack(head: tuple) -> tuple:
    """The typed message of any header array read from a body."""
    return KINDS[head[0]].unpack(head)


@message
class Events(NamedTuple):
    """`count` events follow the header in the same body, each as pack_event made it.

    With a reply address (sync durability) the shard answers [request_id, None or an error]
    once it has committed them.
    """

    reply_to: bytes | None
    request_id: int
    accepted_ns: int  # time.time_ns() when the front end took the request: the apply histogram
    count: int

    KIND = EVENTS

    @staticmethod
    def pack(reply_to: bytes | None, request_id: int, accepted_ns: int, count: int) -> bytes:
        return _packb((EVENTS, reply_to, request_id, accepted_ns, count))


@message
class Get(NamedTuple):
    """Read one product: the shard answers [request_id, packed record or None] on reply_to."""

    reply_to: bytes
    request_id: int
    product_id: str

    KIND = GET

    @staticmethod
    def pack(reply_to: bytes, request_id: int, product_id: str) -> bytes:
        return _packb((GET, reply_to, request_id, product_id))


@message
class Stop(NamedTuple):
    """Drain what is before me, then exit."""

    KIND = STOP

    @staticmethod
    def pack() -> bytes:
        return _packb((STOP,))


@message
class Write(NamedTuple):
    """A catalogue write (productd.store.catalogue): the shard answers [request_id, [outcome,
    value]] on reply_to, once it has committed the write with sync durability."""

    reply_to: bytes
    request_id: int
    op: int  # catalogue.CREATE, PUT, PATCH or DELETE
    product_id: str
    fields: dict | None  # PUT and CREATE: every field; PATCH: the merge patch; DELETE: None
    if_match: str | tuple | None  # "*", a tuple of revisions, or None
    if_none_match: str | None  # "*" or None

    KIND = WRITE

    @staticmethod
    def pack(reply_to, request_id, op, product_id, fields, if_match, if_none_match) -> bytes:
        return _packb((WRITE, reply_to, request_id, op, product_id, fields, if_match, if_none_match))


@message
class GetMany(NamedTuple):
    """Read several products of one shard: the answer is a list of packed records (None for an
    unknown id) in the order of `product_ids`."""

    reply_to: bytes
    request_id: int
    product_ids: tuple[str, ...]

    KIND = GET_MANY

    @staticmethod
    def pack(reply_to: bytes, request_id: int, product_ids) -> bytes:
        return _packb((GET_MANY, reply_to, request_id, tuple(product_ids)))


@message
class Part(NamedTuple):
    """A piece of a message body too big for one frame (`message_frames`). The shard joins the
    pieces of one (reply_to, request_id) and handles the whole body once the last has come;
    other writers' frames may come between them, and the message applies where its last
    piece is in the inbox."""

    reply_to: bytes
    request_id: int
    last: bool
    chunk: bytes

    KIND = PART

    @staticmethod
    def pack(reply_to: bytes, request_id: int, last: bool, chunk: bytes) -> bytes:
        return _packb((PART, reply_to, request_id, last, chunk))


LIST = 6


@message
class List(NamedTuple):
    """The listing's part of one shard (productd.store.listing.select): the first `limit`
    products passing `filters` in `sort` order, strictly after the key `after` (None: from the
    start). The answer is [the shard's change head, [[product_id, packed record], ...]]."""

    reply_to: bytes
    request_id: int
    filters: dict
    sort: str
    after: list | None
    limit: int

    KIND = LIST

    @staticmethod
    def pack(reply_to: bytes, request_id: int, filters: dict, sort: str, after, limit: int) -> bytes:
        return _packb((LIST, reply_to, request_id, filters, sort, after, limit))


@message
class Changes(NamedTuple):
    """The change feed: the changes after seq `after` (None: none, just the heads; a list: the
    positions of a cursor from before a reshard, which the shard translates), at most
    `limit`, of products owned by `user_id` and/or among `ids` (None: any). The answer is
    [status, head, oldest kept, scanned to, [[seq, product id, packed record or None], ...]]
    (productd.store.changes: status OK, EXPIRED or LOST; reshard_history: FOREIGN). When there are none yet the shard
    parks the request and answers as soon as one is applied, or empty after `wait` seconds."""

    reply_to: bytes
    request_id: int
    after: int | list[int] | None
    user_id: str | None
    ids: tuple[str, ...] | None
    limit: int
    wait: float

    KIND = CHANGES

    @staticmethod
    def pack(reply_to: bytes, request_id: int, after, user_id, ids, limit: int, wait: float) -> bytes:
        return _packb((CHANGES, reply_to, request_id, after, user_id, ids, limit, wait))


IMAGE_RESULT = 8


@message
class ImageResult(NamedTuple):
    """An image job's end, from an image worker (productd.images.results.ResultSender) to the
    product's shard: `result` is ("done", key, format, width, height, bytes) or ("failed",
    reason). No answer: the shard applies it only while the product still shows `url`
    (docs/images.md, "Reaching the product"); a worker re-sends it until it is in the inbox."""

    product_id: str
    url: str
    result: tuple

    KIND = IMAGE_RESULT

    @staticmethod
    def pack(product_id: str, url: str, result: tuple) -> bytes:
        return _packb((IMAGE_RESULT, product_id, url, tuple(result)))


PING = 9


@message
class Ping(NamedTuple):
    """The multi-host mode (productd.cluster.owner): an owner process that is not the active
    consumer of its shard's queue publishes one now and then. Whoever is active reads it, which
    is how a consumer the broker made active learns so while the queue is otherwise empty. It
    changes nothing and is never answered."""

    owner: str

    KIND = PING

    @staticmethod
    def pack(owner: str) -> bytes:
        return _packb((PING, owner))


# Room a Part header takes beside its reply address and chunk: fixarray, kind, bin header of the
# address (3), request id (9), the flag and the chunk's bin header (3) is 18; rounded up.
PART_HEADER_ROOM = 32


def message_frames(body: bytes, reply_to: bytes, request_id: int) -> list[bytes]:
    """The frames that carry one message body: the body itself when it fits, else Parts."""
    if len(body) <= MAX_BODY:
        return [frame(body)]
    room = MAX_BODY - PART_HEADER_ROOM - len(reply_to)
    chunks = [body[start:start + room] for start in range(0, len(body), room)]
    return [frame(Part.pack(reply_to, request_id, i == len(chunks) - 1, chunk)) for i, chunk in enumerate(chunks)]


# Room the header array of an Events frame may take beside its reply address: fixarray (1),
# kind (1), bin header (at most 3), then request id, accepted_ns and count (at most 9 each,
# msgpack's widest integers) is 32; tests/test_protocol.py builds the widest header there is.
EVENTS_HEADER_ROOM = 40


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
    room = MAX_BODY - EVENTS_HEADER_ROOM - (len(reply_to) if reply_to else 0)
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
    head = Events.pack(reply_to, request_id, accepted_ns, len(chunks))
    return indexes, request_id, frame(head + b"".join(chunks))


def get_frame(reply_to: bytes, request_id: int, product_id: str) -> bytes:
    return frame(Get.pack(reply_to, request_id, product_id))


def stop_frame() -> bytes:
    return frame(Stop.pack())


# A reply bigger than this travels as several datagrams (`reply_datagrams`): a Unix datagram
# must fit the sender's socket buffer whole, and the front end reads at most MAX_REPLY at once.
REPLY_PART = 32 * 1024
MAX_REPLY = 65536


def pack_reply(request_id: int, payload: object) -> bytes:
    return _packb((request_id, payload))


def reply_datagrams(request_id: int, payload: object) -> list[bytes]:
    """[request_id, payload] in one datagram, or, when that is too big, the packed payload cut
    into [request_id, chunk, parts left after this one] datagrams."""
    whole = _packb((request_id, payload))
    if len(whole) <= REPLY_PART:
        return [whole]
    packed = _packb(payload)
    chunks = [packed[start:start + REPLY_PART] for start in range(0, len(packed), REPLY_PART)]
    return [_packb((request_id, chunk, len(chunks) - 1 - i)) for i, chunk in enumerate(chunks)]


def unpack_reply(data: bytes) -> tuple:
    """(request_id, payload), or (request_id, chunk, parts left) for a piece of a big reply."""
    return msgpack.unpackb(data, raw=False)


def unpack_payload(chunks: list[bytes]) -> object:
    return msgpack.unpackb(b"".join(chunks), raw=False)


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
