"""The wire protocol's message kinds: a round trip of each, the shard's handler for each, and the
frame-size arithmetic against the widest header that can be built (pure logic, no processes)."""

from __future__ import annotations

import itertools
import socket
import time

import pytest
from frames import RecordingShard

from productd.actors import protocol, status
from productd.actors.shard import HANDLERS
from productd.http.validation import PRODUCT_ID_RULE

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1  # msgpack's widest integer: no request id or count can be wider
# The longest AF_UNIX address: sun_path is 108 bytes on Linux, an abstract one included.
LONGEST_REPLY_TO = b"\0" + b"r" * 107
LONGEST_PRODUCT_ID = "p" * 128  # validation's limit (see PRODUCT_ID_RULE), one byte per character

# One message of each kind, as the front end or the supervisor sends it: a kind added to
# protocol.KINDS without a sample here fails test_every_kind_has_a_sample_and_a_handler.
SAMPLES = {
    protocol.Events: [
        protocol.Events(None, 1, 1_700_000_000_000_000_000, 2),
        protocol.Events(b"\0abcde", UINT64_MAX, INT64_MAX, 1),
    ],
    protocol.Get: [protocol.Get(b"\0abcde", 7, "prod-3"), protocol.Get(LONGEST_REPLY_TO, UINT64_MAX, "x")],
    protocol.Stop: [protocol.Stop()],
    protocol.Write: [
        protocol.Write(b"\0abcde", 3, 1, "prod-3", {"name": "n", "images": ("https://x/y",)}, (4, 5), None),
        protocol.Write(LONGEST_REPLY_TO, UINT64_MAX, 3, "x", None, "*", "*"),
    ],
    protocol.GetMany: [protocol.GetMany(b"\0abcde", 8, ("a", "b")), protocol.GetMany(LONGEST_REPLY_TO, 1, ())],
    protocol.Part: [protocol.Part(b"\0abcde", 9, False, b"piece"), protocol.Part(b"\0a", UINT64_MAX, True, b"")],
    protocol.List: [
        protocol.List(b"\0abcde", 10, {"user_id": "u", "in_stock": True}, "-price", (0, -2.5, "p"), 101),
        protocol.List(LONGEST_REPLY_TO, UINT64_MAX, {}, "product_id", None, 1001),
    ],
    protocol.Changes: [
        protocol.Changes(b"\0abcde", 11, 5, "u", ("a", "b"), 1000, 15.0),
        protocol.Changes(LONGEST_REPLY_TO, UINT64_MAX, None, None, None, 1, 0.0),
    ],
    protocol.ImageResult: [
        protocol.ImageResult("prod-3", "https://x/y.jpg", ("done", "a" * 64 + ".webp", "webp", 1024, 768, 29000)),
        protocol.ImageResult("x", "http://h/", ("failed", "http-4xx")),
    ],
    protocol.Ping: [protocol.Ping("host-a:1234"), protocol.Ping("")],
}


def _read_back(frame: bytes) -> tuple[tuple, list[tuple]]:
    """(typed header, items after it) of one frame, read the way a shard reads its inbox."""
    reader = protocol.FrameReader()
    [body] = reader.feed(frame)
    assert reader.skipped == 0
    items = protocol.body_unpacker()
    items.feed(body)
    head = items.unpack()
    return protocol.unpack(head), list(items)


def test_every_kind_has_a_sample_and_a_handler():
    assert set(SAMPLES) == set(protocol.KINDS.values())
    assert set(HANDLERS) == set(protocol.KINDS)
    assert (protocol.EVENTS, protocol.GET, protocol.STOP) == (
        protocol.Events.KIND, protocol.Get.KIND, protocol.Stop.KIND,
    )  # fmt: skip


@pytest.mark.parametrize("message", [m for samples in SAMPLES.values() for m in samples], ids=repr)
def test_every_kind_round_trips_through_pack_and_unpack(message):
    count = message.count if isinstance(message, protocol.Events) else 0
    events = [protocol.pack_event(f"p{i}", 1.5, i, None) for i in range(count)]
    frame = protocol.frame(type(message).pack(*message) + b"".join(events))
    got, items = _read_back(frame)
    assert type(got) is type(message)
    assert got == message
    assert len(items) == len(events)


def test_the_public_helpers_build_the_typed_messages():
    address = b"\0abcde"
    packed = [(i, protocol.pack_event(f"p{i}", 1.25 * i, i, i + 1)) for i in range(3)]
    [(indexes, request_id, frame)] = protocol.events_frames(packed, address, itertools.count(41), 123)
    assert (indexes, request_id) == ([0, 1, 2], 41)
    got, items = _read_back(frame)
    assert got == protocol.Events(address, 41, 123, 3)
    assert items == [("p0", 0.0, 0, 1), ("p1", 1.25, 1, 2), ("p2", 2.5, 2, 3)]
    assert _read_back(protocol.get_frame(address, 9, "prod-3")) == (protocol.Get(address, 9, "prod-3"), [])
    assert _read_back(protocol.stop_frame()) == (protocol.Stop(), [])
    assert protocol.unpack_reply(protocol.pack_reply(UINT64_MAX, b"record")) == [UINT64_MAX, b"record"]
    assert protocol.unpack_reply(protocol.pack_reply(5, None)) == [5, None]


@pytest.mark.parametrize("reply_to", [None, b"", b"\0abcde", b"\0" + b"r" * 254, LONGEST_REPLY_TO])
def test_the_widest_events_header_fits_the_room_events_frames_keeps_for_it(reply_to):
    widest = protocol.Events.pack(reply_to, UINT64_MAX, INT64_MAX, UINT64_MAX)
    assert len(widest) <= protocol.EVENTS_HEADER_ROOM + len(reply_to or b"")


def test_the_longest_reply_address_is_what_linux_allows():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(LONGEST_REPLY_TO)
        assert sock.getsockname() == LONGEST_REPLY_TO
        with pytest.raises(OSError):
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(LONGEST_REPLY_TO + b"r")


@pytest.mark.parametrize("event_size", ["smallest", "largest"])
def test_full_events_frames_with_the_widest_header_stay_within_pipe_buf(event_size):
    """events_frames fills each frame up to its reserve; with every header field at its widest,
    no frame may exceed PIPE_BUF (frame() raises if one does)."""
    if event_size == "smallest":  # the most events per frame: the widest count
        packed = protocol.pack_event("p", None, 0, None)
    else:
        packed = protocol.pack_event(LONGEST_PRODUCT_ID, 1.2345678901234e300, INT64_MAX, INT64_MAX)
    items = [(i, packed) for i in range(3 * protocol.MAX_BODY // len(packed))]
    frames = list(protocol.events_frames(items, LONGEST_REPLY_TO, itertools.count(UINT64_MAX - 10), INT64_MAX))
    assert len(frames) >= 3
    for indexes, request_id, frame in frames:
        assert len(frame) <= protocol.PIPE_BUF
        got, events = _read_back(frame)
        assert got == protocol.Events(LONGEST_REPLY_TO, request_id, INT64_MAX, len(indexes))
        assert len(events) == len(indexes)
    assert [i for indexes, _, _ in frames for i in indexes] == list(range(len(items)))
    # Full means full: one more event would not have fitted the room kept beside the header.
    room = protocol.MAX_BODY - protocol.EVENTS_HEADER_ROOM - len(LONGEST_REPLY_TO)
    assert all(len(indexes) * len(packed) + len(packed) > room for indexes, _, _ in frames[:-1])


def test_the_widest_get_frame_fits():
    assert "128" in PRODUCT_ID_RULE  # the longest product id above is validation's
    frame = protocol.get_frame(LONGEST_REPLY_TO, UINT64_MAX, LONGEST_PRODUCT_ID)
    assert len(frame) <= protocol.PIPE_BUF
    assert _read_back(frame)[0] == protocol.Get(LONGEST_REPLY_TO, UINT64_MAX, LONGEST_PRODUCT_ID)


def test_the_widest_image_result_frame_fits():
    """The longest product id and image URL validation takes, every number at msgpack's widest and
    the longest reason ResultSender lets through: still one frame."""
    from productd.http.product_input import MAX_URL
    from productd.images.results import MAX_REASON

    url = "https://" + "h" * (MAX_URL - 8)
    for result in (("done", "f" * 64 + ".webp", "webp", UINT64_MAX, UINT64_MAX, UINT64_MAX),
                   ("failed", "r" * MAX_REASON)):
        message = protocol.ImageResult(LONGEST_PRODUCT_ID, url, result)
        frame = protocol.frame(protocol.ImageResult.pack(*message))
        assert len(frame) <= protocol.PIPE_BUF
        assert _read_back(frame)[0] == message


def test_a_kind_code_is_registered_once():
    class Twice(protocol.NamedTuple):
        KIND = protocol.GET

    with pytest.raises(ValueError, match="taken by Get"):
        protocol.message(Twice)


def _bodies(*frames: bytes) -> list[bytes]:
    return protocol.FrameReader().feed(b"".join(frames))


def test_the_shard_handles_every_kind_by_its_fields():
    """Each handler reads the header's fields in the order its kind declares them: a handler that
    took one field for another would answer the wrong address, request or product here."""
    shard = RecordingShard()
    board = shard.board
    address, other = b"\0abcde", b"\0fghij"
    accepted_ns = time.time_ns() - 10**9  # a second before the shard applies them
    events = [(i, protocol.pack_event(f"p{i}", 1.5, i, None)) for i in range(3)]
    [(_, request_id, events_frame)] = protocol.events_frames(events, address, itertools.count(41), accepted_ns)
    assert not shard.handle(_bodies(events_frame))
    assert shard.pending_acks == [(address, request_id, None)]  # answered once committed
    assert [board.get(0, f) for f in (status.RECEIVED, status.APPLIED, status.APPLY_COUNT)] == [3, 3, 3]
    assert board.get(0, status.APPLY_SUM_US) >= 3 * 10**6  # accepted_ns read as accepted_ns
    assert not shard.handle(_bodies(protocol.get_frame(other, 9, "p2"), protocol.get_frame(address, 10, "p9")))
    assert shard.sent == [(other, 9, shard.store.get_packed("p2")), (address, 10, None)]
    assert shard.sent[0][2] is not None and board.get(0, status.READS) == 2
    assert shard.handle(_bodies(protocol.stop_frame(), protocol.get_frame(address, 11, "p1")))
    # A read behind STOP in the same read of the inbox is told at once that the shard is stopping.
    assert shard.sent[2:] == [(address, 11, protocol.UNAVAILABLE)]


def test_the_shard_applies_an_image_result_by_its_fields():
    from productd.store import catalogue, record

    shard = RecordingShard()
    fields = {"user_id": "u", "name": "n", "images": ("https://x/a.jpg", "https://x/b.jpg")}
    shard.handle(_bodies(protocol.frame(protocol.Write.pack(b"\0abc", 1, catalogue.CREATE, "p1", fields, None, None))))
    done = ("done", "k" * 64 + ".webp", "webp", 10, 20, 30)
    shard.handle(_bodies(protocol.frame(protocol.ImageResult.pack("p1", "https://x/b.jpg", done))))
    assert record.unpack(shard.store.get_packed("p1")).image_results == {"https://x/b.jpg": done}
