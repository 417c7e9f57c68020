"""Unit tests for the pure parts: the record and its merge rule, one shard's map, the SQLite
shard file, the inbox frame reader and request validation. No processes, no HTTP."""

from __future__ import annotations

import math
import sqlite3
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from productd.actors import protocol
from productd.http import validation
from productd.http.problems import Problem
from productd.store import record
from productd.store.memory import ShardStore
from productd.store.record import Product, merge, pack_fields, unpack
from productd.store.sqlite import SCHEMA_VERSION, ShardFile, StoreFileError

INT64_MAX = 2**63 - 1
# Hypothesis' own per-example deadline is a timing assertion: off, the machine is shared and noisy.
PROPS = settings(deadline=None, max_examples=300, database=None)

prices = st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False)
stocks = st.integers(min_value=0, max_value=INT64_MAX)
versions = st.integers(min_value=0, max_value=INT64_MAX)
stamps = st.integers(min_value=0, max_value=INT64_MAX)


# ---------------------------------------------------------------- record: merge rule


def fields(packed: bytes) -> tuple:
    """price, stock, version, updated_at: what events change (the rest: tests/test_catalogue_store.py)."""
    return tuple(unpack(packed))[:4]


def test_first_event_creates_the_record_with_unset_fields_as_none():
    assert fields(merge(None, 9.5, None, None, 11)) == (9.5, None, None, 11)
    assert fields(merge(None, None, 3, 7, 12)) == (None, 3, 7, 12)
    assert fields(merge(None, 0.0, 0, 0, 0)) == (0.0, 0, 0, 0)


def test_version_equal_or_lower_is_stale_and_ignored_whole():
    stored = merge(None, 10.0, 5, 7, 100)
    assert merge(stored, 99.0, 99, 7, 200) is None  # equal: a replay
    assert merge(stored, 99.0, None, 6, 200) is None  # lower, even with only one field
    assert merge(stored, None, 1, 0, 200) is None
    assert fields(stored) == (10.0, 5, 7, 100)


def test_higher_version_applies_and_partial_fields_keep_their_value():
    stored = merge(None, 10.0, 5, 7, 100)
    assert fields(merge(stored, 12.5, None, 8, 200)) == (12.5, 5, 8, 200)
    assert fields(merge(stored, None, 0, 2**62, 300)) == (10.0, 0, 2**62, 300)


def test_event_without_version_applies_and_keeps_the_stored_version():
    stored = merge(None, 10.0, 5, 7, 100)
    assert fields(merge(stored, None, 4, None, 200)) == (10.0, 4, 7, 200)
    unversioned = merge(None, 1.0, None, None, 100)
    assert fields(merge(unversioned, None, 2, None, 150)) == (1.0, 2, None, 150)
    # A record that never had a version takes the first one it is given, 0 included.
    assert fields(merge(unversioned, None, 3, 0, 200)) == (1.0, 3, 0, 200)


@pytest.mark.parametrize(
    "fields_in",
    [
        (None, None, None, 0),
        (0.0, 0, 0, 0),
        (49.99, 100, 3, 1_763_000_000_000_000_000),
        (1e300, INT64_MAX, INT64_MAX, INT64_MAX),
        (5e-324, None, 0, 1),  # the smallest subnormal float survives packing
        (None, 7, None, 2),
    ],
)
def test_pack_unpack_roundtrip(fields_in):
    assert tuple(unpack(pack_fields(*fields_in)))[:4] == fields_in


@PROPS
@given(st.one_of(st.none(), prices), st.one_of(st.none(), stocks), st.one_of(st.none(), versions), stamps)
def test_pack_unpack_roundtrip_property(price, stock, version, stamp):
    assert tuple(unpack(pack_fields(price, stock, version, stamp)))[:4] == (price, stock, version, stamp)


events = st.tuples(
    st.one_of(st.none(), prices),
    st.one_of(st.none(), stocks),
    st.one_of(st.none(), st.integers(min_value=0, max_value=20)),  # small range: ties and replays happen
).filter(lambda e: e[0] is not None or e[1] is not None)  # the API needs price or stock


def model_apply(state: dict | None, price, stock, version, now) -> dict | None:
    """The documented rule, written out plainly: the reference the packed merge must match."""
    if state is None:
        return {"price": price, "stock": stock, "version": version, "at": now}
    if version is not None and state["version"] is not None and version <= state["version"]:
        return None
    return {
        "price": state["price"] if price is None else price,
        "stock": state["stock"] if stock is None else stock,
        "version": state["version"] if version is None else version,
        "at": now,
    }


@PROPS
@given(st.lists(events, min_size=1, max_size=30))
def test_merge_matches_the_documented_rule_for_any_sequence(seq):
    packed, state = None, None
    for now, (price, stock, version) in enumerate(seq, 1):
        new_packed = merge(packed, price, stock, version, now)
        new_state = model_apply(state, price, stock, version, now)
        assert (new_packed is None) == (new_state is None), (seq, now)
        if new_packed is not None:
            packed, state = new_packed, new_state
        assert tuple(unpack(packed))[:4] == (state["price"], state["stock"], state["version"], state["at"])


@PROPS
@given(
    st.dictionaries(versions, st.tuples(prices, stocks), min_size=1, max_size=12),
    st.randoms(use_true_random=False),
    st.integers(min_value=0, max_value=3),
)
def test_full_versioned_events_in_any_order_end_at_the_highest_version(by_version, rnd, replays):
    """Events that each carry a distinct version and both fields, delivered in any order and with
    replays (exact duplicates), leave the fields of the highest version. (With partial events or two
    different events of one version the result does depend on the order, so it is not claimed.)"""
    seq = [(p, s, v) for v, (p, s) in by_version.items()]
    seq += [rnd.choice(seq) for _ in range(replays)]
    rnd.shuffle(seq)
    packed = None
    for now, (price, stock, version) in enumerate(seq, 1):
        packed = merge(packed, price, stock, version, now) or packed
    top = max(by_version)
    result = unpack(packed)
    assert (result.price, result.stock, result.version) == (*by_version[top], top)


@PROPS
@given(st.lists(events, min_size=1, max_size=20))
def test_replaying_a_whole_versioned_history_changes_nothing(seq):
    """Applying a history, then every versioned event of it again, gives the same record when the
    record ends up versioned: every replayed version is <= the stored one."""
    packed = None
    for now, (price, stock, version) in enumerate(seq, 1):
        packed = merge(packed, price, stock, version, now) or packed
    if unpack(packed).version is None:
        return
    for price, stock, version in seq:
        if version is not None:
            assert merge(packed, price, stock, version, 10**9) is None


# ---------------------------------------------------------------- ShardStore


def test_shard_store_apply_get_and_stale_count():
    store = ShardStore()
    assert len(store) == 0 and store.get_packed("a") is None
    assert store.apply("a", 1.5, None, 3, 10, 1) is not None
    assert store.apply("a", 9.0, 9, 3, 20, 2) is None  # stale: equal version
    assert store.apply("a", None, 4, None, 30, 3) is not None
    assert store.apply("b", None, 1, None, 40, 4) is not None
    assert len(store) == 2
    assert unpack(store.get_packed("a")) == Product(1.5, 4, 3, 30, 10, 3)  # created at 10, revision 3
    assert unpack(store.get_packed("b")) == Product(None, 1, None, 40, 40, 4)


def test_shard_store_load_puts_records_back_verbatim():
    store = ShardStore()
    packed = pack_fields(2.0, None, 5, 123)
    store.load("x", packed)
    assert store.get_packed("x") == packed
    assert unpack(store.get_packed("x")) == Product(2.0, None, 5, 123, 123, 0)
    assert store.apply("x", 3.0, None, 5, 200) is None  # the loaded version still guards
    assert store.apply("x", 3.0, None, 6, 200) is not None


# ---------------------------------------------------------------- ShardFile (SQLite)


ROWS = {
    "p-1": pack_fields(49.99, 100, 3, 1_763_000_000_123_456_789),
    "p-none": pack_fields(None, None, None, 1),
    "p-price-only": pack_fields(0.0, None, 0, 2),
    "p-stock-only": pack_fields(None, INT64_MAX, INT64_MAX, INT64_MAX),
    "id:with@odd~chars._-": pack_fields(1e-300, 0, None, 3),
}


@pytest.mark.parametrize("sync", [False, True])
def test_shard_file_save_rows_roundtrip_across_reopen(tmp_path, sync):
    path = str(tmp_path / "shard-000.sqlite3")
    f = ShardFile(path, sync=sync)
    assert list(f.rows()) == []
    assert f.save(list(ROWS.items())) == len(ROWS)
    assert dict(f.rows()) == ROWS
    f.close()
    again = ShardFile(path, sync=sync)
    assert dict(again.rows()) == ROWS
    assert len(list(again.rows())) == len(ROWS)
    newer = pack_fields(50.0, 99, 4, 1_763_000_000_999_999_999)
    again.save([("p-1", newer)])  # the same id again replaces its row
    assert len(list(again.rows())) == len(ROWS)
    assert dict(again.rows())["p-1"] == newer
    again.close()


def test_shard_file_is_readable_by_an_operator_with_plain_sql(tmp_path):
    path = str(tmp_path / "shard-000.sqlite3")
    f = ShardFile(path, sync=True)
    f.save(ROWS.items())
    f.close()
    db = sqlite3.connect(path)
    try:
        rows = dict((r[0], r[1:]) for r in db.execute("SELECT id, price, stock, version, updated_at_ns FROM products"))
    finally:
        db.close()
    assert rows["p-1"] == (49.99, 100, 3, 1_763_000_000_123_456_789)
    assert rows["p-none"] == (None, None, None, 1)
    assert rows["p-stock-only"] == (None, INT64_MAX, INT64_MAX, INT64_MAX)


def test_shard_file_from_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "shard-000.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE future (x)")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreFileError) as info:
        ShardFile(str(path), sync=False)
    assert str(path) in str(info.value)
    assert "newer" in str(info.value)


def test_shard_file_from_a_newer_schema_is_left_byte_for_byte_alone(tmp_path):
    """Refusing a file must not change it: a newer productd may use another journal mode."""
    path = tmp_path / "shard-000.sqlite3"
    db = sqlite3.connect(path)  # a rollback-journal database, as a future format might be
    db.execute("CREATE TABLE future (x)")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreFileError):
        ShardFile(str(path), sync=False)
    assert path.read_bytes() == before, "refusing the file changed its header (it was switched to WAL mode)"


@pytest.mark.parametrize(
    "garbage",
    [
        bytes(range(256)) * 32,
        b"SQLite format 3\x00" + b"\xff" * 4080,  # the right magic, nothing sane after it
    ],
    ids=["random-bytes", "bad-header"],
)
def test_garbage_shard_file_raises_store_file_error_naming_it(tmp_path, garbage):
    path = tmp_path / "shard-001.sqlite3"
    path.write_bytes(garbage)
    with pytest.raises(StoreFileError) as info:
        ShardFile(str(path), sync=False)
    assert str(path) in str(info.value)
    assert path.read_bytes() == garbage


# ---------------------------------------------------------------- FrameReader


def sample_frames() -> list[bytes]:
    packed = [(i, protocol.pack_event(f"prod-{i}", 1.25 * i, i, i + 1)) for i in range(30)]
    frames = [f for _, _, f in protocol.events_frames(packed, b"\0reply-addr", iter(range(100, 200)), 123)]
    frames.append(protocol.get_frame(b"\0reply-addr", 7, "prod-3"))
    big = [(i, protocol.pack_event("x" * 120 + str(i), None, i, None)) for i in range(60)]
    frames += [f for _, _, f in protocol.events_frames(big, None, iter(range(300, 400)), 456)]
    frames.append(protocol.stop_frame())
    return frames


def body_of(frame: bytes) -> bytes:
    return frame[protocol.HEADER_SIZE :]


def test_sample_frames_are_well_formed():
    frames = sample_frames()
    assert len(frames) >= 5
    assert any(len(f) > 2000 for f in frames)  # some frames are cut from a bulk request
    for f in frames:
        assert len(f) <= protocol.PIPE_BUF
        unpacker = protocol.body_unpacker()
        unpacker.feed(body_of(f))
        head, *events = list(unpacker)
        assert head[0] in (protocol.EVENTS, protocol.GET, protocol.STOP)
        assert len(events) == (head[4] if head[0] == protocol.EVENTS else 0)


def test_frames_split_across_two_reads_at_every_byte_offset():
    frames = sample_frames()[:4]
    stream = b"".join(frames)
    expected = [body_of(f) for f in frames]
    for cut in range(len(stream) + 1):
        reader = protocol.FrameReader()
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == expected, cut
        assert reader.skipped == 0


def test_frames_fed_one_byte_at_a_time():
    frames = sample_frames()
    stream = b"".join(frames)
    reader = protocol.FrameReader()
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == [body_of(f) for f in frames]
    assert reader.skipped == 0


def test_resync_after_a_frames_head_was_cut_off_at_every_offset():
    """A restarted shard may find the tail of a frame its predecessor half read: that tail is
    skipped and counted, and every later frame comes out intact, whatever the cut."""
    frames = sample_frames()
    first, rest = frames[0], frames[1:]
    magic = protocol.MAGIC.to_bytes(2, "little")
    for cut in range(1, len(first)):
        tail = first[cut:]
        if magic in tail:  # a false frame start: covered by the next test
            continue
        for split in (0, len(tail), len(tail) + 3):  # the later frames in the same read, or a later one
            stream = tail + b"".join(rest)
            reader = protocol.FrameReader()
            got = reader.feed(stream[:split]) + reader.feed(stream[split:])
            assert got == [body_of(f) for f in rest], (cut, split)
            assert reader.skipped == len(tail), (cut, split)


def test_resync_skips_a_false_frame_start_in_the_garbage():
    """Garbage that holds the magic with a plausible length and a wrong checksum: no later frame is
    lost or damaged once the bytes the false header claims have arrived."""
    frames = sample_frames()
    fake = protocol.MAGIC.to_bytes(2, "little") + (300).to_bytes(2, "little") + b"\0\0\0\0" + b"junk"
    garbage = b"\x01\x02" + fake + b"\x03"
    stream = garbage + b"".join(frames)
    assert len(stream) > len(garbage) + 300 + protocol.HEADER_SIZE
    reader = protocol.FrameReader()
    got = reader.feed(stream)
    assert got == [body_of(f) for f in frames]
    assert reader.skipped == len(garbage)


def test_frame_with_a_bad_checksum_is_dropped_and_the_next_one_read():
    frames = sample_frames()
    bad = bytearray(frames[0])
    bad[-1] ^= 0xFF
    assert zlib.crc32(bytes(bad[protocol.HEADER_SIZE :])) != zlib.crc32(body_of(frames[0]))
    reader = protocol.FrameReader()
    got = reader.feed(bytes(bad) + frames[1] + frames[2])
    assert got == [body_of(frames[1]), body_of(frames[2])]
    assert reader.skipped == len(bad)


def test_frame_body_larger_than_pipe_buf_is_refused():
    with pytest.raises(ValueError):
        protocol.frame(b"x" * (protocol.MAX_BODY + 1))
    assert len(protocol.frame(b"x" * protocol.MAX_BODY)) == protocol.PIPE_BUF


# ---------------------------------------------------------------- validation


def problem(fn, body: bytes) -> Problem:
    with pytest.raises(Problem) as info:
        fn(body)
    return info.value


def error_pointers(p: Problem) -> set[str]:
    return {e["pointer"] for e in p.extra.get("errors", [])}


@pytest.mark.parametrize(
    "body, events",
    [
        (b'{"product_id": "a", "price": 1}', [("a", 1.0, None, None)]),
        (b'{"product_id": "a", "stock": 0, "version": null}', [("a", None, 0, None)]),
        (b'{"product_id": "a", "price": -0.0}', [("a", 0.0, None, None)]),
        (b'{"product_id": "a", "stock": 5.0, "version": 2.0}', [("a", None, 5, 2)]),  # integral floats
        (
            b'[{"product_id": "a:b@c~d.e_f-g", "price": 2.5, "stock": 9223372036854775807, "version": 0}]',
            [("a:b@c~d.e_f-g", 2.5, INT64_MAX, 0)],
        ),
        (b'[{"product_id": "a", "price": 1}, {"product_id": "b", "stock": 2, "version": 5}]',
         [("a", 1.0, None, None), ("b", None, 2, 5)]),
    ],
)
def test_valid_json_bodies(body, events):
    got = validation.events_from_json(body)
    assert got == events
    for _, price, stock, version in got:
        if price is not None:
            assert type(price) is float and math.copysign(1, price) == 1
        assert all(type(n) is int for n in (stock, version) if n is not None)


@pytest.mark.parametrize(
    "body, status, pointers",
    [
        (b"", 400, set()),
        (b"{", 400, set()),
        (b"[]", 400, set()),
        (b"\xff\xfe", 400, set()),
        (b"42", 422, {""}),
        (b'{"product_id": "a", "stock": true}', 422, {"/stock"}),
        (b'{"product_id": "a", "stock": 1.5}', 422, {"/stock"}),
        (b'{"product_id": "a", "stock": 1e17}', 422, {"/stock"}),  # integral, but past 2**53: not exact
        (b'{"product_id": "a", "stock": 9223372036854775808}', 422, {"/stock"}),
        (b'{"product_id": "a", "price": 1e400}', 422, {"/price"}),
        (b'{"product_id": "a", "price": -1}', 422, {"/price"}),
        (b'{"product_id": "a", "price": "1"}', 422, {"/price"}),
        (b'{"product_id": "a", "version": -1, "price": 1}', 422, {"/version"}),
        (b'{"product_id": "a"}', 422, {""}),
        (b'{"product_id": "..", "price": 1}', 422, {"/product_id"}),
        (b'{"product_id": "a/b", "price": 1}', 422, {"/product_id"}),
        (b'{"price": 1}', 422, {"/product_id"}),
        (b'{"product_id": "a", "price": 1, "colour": "red"}', 422, {"/colour"}),
        (b'[{"product_id": "a", "price": 1}, {"product_id": "b", "stock": -2}, 7]', 422, {"/1/stock", "/2"}),
    ],
)
def test_invalid_json_bodies(body, status, pointers):
    p = problem(validation.events_from_json, body)
    assert p.status_code == status
    assert error_pointers(p) == pointers


def test_too_many_events_is_413_before_any_item_is_validated():
    """A client learns about the size limit first: splitting the request is the fix either way."""
    bad_items = b"[" + b",".join([b'{"stock": true}'] * 4) + b"]"
    assert problem(lambda body: validation.events_from_json(body, max_events=3), bad_items).status_code == 413
    assert problem(lambda body: validation.events_from_json(body, max_events=4), bad_items).status_code == 422
    lines = b"\n".join([b'{"stock": true}'] * 4) + b"\n\n"
    assert problem(lambda body: validation.events_from_ndjson(body, max_events=3), lines).status_code == 413
    assert problem(lambda body: validation.events_from_ndjson(body, max_events=4), lines).status_code == 422


def test_ndjson_lines_are_indexed_over_non_empty_lines():
    body = (
        b'{"product_id": "a", "price": 1}\n\n  \n'
        b'{"product_id": "b", "stock": 1.5}\r\n'
        b'{"product_id": "c", "stock": 3}\n'
    )
    p = problem(validation.events_from_ndjson, body)
    assert p.status_code == 422
    assert error_pointers(p) == {"/1/stock"}
    good = b'{"product_id": "a", "price": 1}\n{"product_id": "c", "stock": 3}'
    assert validation.events_from_ndjson(good) == [("a", 1.0, None, None), ("c", None, 3, None)]
    assert problem(validation.events_from_ndjson, b"\n \n").status_code == 400
    malformed = problem(validation.events_from_ndjson, b'{"product_id": "a", "price": 1}\n{oops\n')
    assert malformed.status_code == 400
    assert error_pointers(malformed) == {"/1"}


def test_record_module_uses_nan_and_minus_one_only_internally():
    # The sentinels never leak: a record whose fields were never set reads back as None.
    assert record.UNSET == -1
    assert unpack(pack_fields(None, None, None, 0)) == Product(None, None, None, 0, 0, 0)
