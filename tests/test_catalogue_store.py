"""Pure logic of the catalogue: records with details, the write rules a shard applies, the input
rules, messages cut into Parts and replies cut into pieces, and the shard's handlers for them.
No processes, no HTTP (tests/test_catalogue.py covers the live service)."""

from __future__ import annotations

import itertools
import re
import sqlite3

import msgpack
import pytest
from frames import RecordingShard
from hypothesis import given, settings
from hypothesis import strategies as st

from productd.actors import protocol
from productd.actors.shard import Shard
from productd.http import product_input
from productd.http.problems import Problem
from productd.store import catalogue
from productd.store.record import CORE_SIZE, details, merge, pack_fields, revision, unpack, upgrade
from productd.store.sqlite import ShardFile

PROPS = settings(deadline=None, max_examples=200, database=None)
DETAILS = ("u-1", "Blue mug", "A mug. Blue.", ("https://img.example/a.png", "http://img.example/b"))


def fields_of(**kw) -> dict:
    base = dict.fromkeys(product_input.REPLACED)
    base.update(kw)
    return base


# ---------------------------------------------------------------- records


def test_a_bare_record_is_the_core_alone_and_details_follow_it():
    bare = pack_fields(1.5, 3, None, 10, 5, 7)
    assert len(bare) == CORE_SIZE == 48
    assert details(bare) is None
    full = pack_fields(1.5, 3, None, 10, 5, 7, DETAILS)
    assert full[:CORE_SIZE] == bare
    assert details(full) == DETAILS
    p = unpack(full)
    assert (p.price, p.stock, p.version, p.updated_at_ns, p.created_at_ns, p.revision) == (1.5, 3, None, 10, 5, 7)
    assert (p.user_id, p.name, p.description, p.images) == DETAILS


def test_an_event_keeps_the_details_and_created_at_and_takes_the_new_revision():
    full = pack_fields(1.5, 3, 2, 10, 5, 7, DETAILS)
    new = merge(full, 9.0, None, None, 20, 8)
    p = unpack(new)
    assert (p.price, p.stock, p.version, p.updated_at_ns, p.created_at_ns, p.revision) == (9.0, 3, 2, 20, 5, 8)
    assert details(new) == DETAILS
    assert merge(full, 9.0, None, 2, 20, 8) is None  # stale version: nothing changes


def test_a_record_from_before_the_catalogue_is_upgraded():
    import struct

    legacy = struct.pack("<dqqq", 2.5, 4, 1, 99)
    p = unpack(upgrade(legacy))
    assert (p.price, p.stock, p.version, p.updated_at_ns, p.created_at_ns, p.revision) == (2.5, 4, 1, 99, 99, 0)
    assert upgrade(None) is None


# ---------------------------------------------------------------- catalogue write rules


def apply(current, op, fields=None, if_match=None, if_none_match=None, now=100, rev=50):
    return catalogue.apply(current, op, fields, if_match, if_none_match, now, rev)


def test_create_then_exists():
    outcome, new = apply(None, catalogue.CREATE, fields_of(user_id="u", name="n", price=2.0))
    assert outcome == catalogue.CREATED
    p = unpack(new)
    assert (p.user_id, p.name, p.price, p.stock, p.revision, p.created_at_ns) == ("u", "n", 2.0, None, 50, 100)
    assert apply(new, catalogue.CREATE, fields_of(user_id="u", name="m")) == (catalogue.EXISTS, 50)


def test_put_replaces_and_clears_what_it_leaves_out_but_keeps_version_and_created_at():
    _, old = apply(None, catalogue.CREATE, fields_of(user_id="u", name="n", description="d", price=2.0, stock=3,
                                                     version=4), now=10, rev=1)
    outcome, new = apply(old, catalogue.PUT, fields_of(user_id="v", name="m"), now=20, rev=2)
    assert outcome == catalogue.OK
    p = unpack(new)
    assert (p.user_id, p.name, p.description, p.images, p.price, p.stock) == ("v", "m", None, (), None, None)
    assert (p.version, p.created_at_ns, p.updated_at_ns, p.revision) == (4, 10, 20, 2)


def test_put_on_an_absent_product_creates_it():
    assert apply(None, catalogue.PUT, fields_of(user_id="u", name="n"))[0] == catalogue.CREATED


def test_patch_merges_and_null_clears():
    _, old = apply(None, catalogue.CREATE, fields_of(user_id="u", name="n", description="d", price=2.0, stock=3))
    outcome, new = apply(old, catalogue.PATCH, {"description": None, "stock": 9})
    assert outcome == catalogue.OK
    p = unpack(new)
    assert (p.user_id, p.name, p.description, p.price, p.stock) == ("u", "n", None, 2.0, 9)
    assert apply(None, catalogue.PATCH, {"stock": 1}) == (catalogue.NOT_FOUND, None)


def test_details_need_an_owner_and_a_name():
    bare = merge(None, 1.0, 1, None, 5, 1)
    outcome, message = apply(bare, catalogue.PATCH, {"description": "x"})
    assert outcome == catalogue.INVALID and "user_id and name" in message
    outcome, new = apply(bare, catalogue.PATCH, {"user_id": "u", "name": "n"})
    assert outcome == catalogue.OK and unpack(new).price == 1.0
    assert apply(bare, catalogue.PATCH, {"price": 3.0})[0] == catalogue.OK  # stays bare
    assert details(apply(bare, catalogue.PATCH, {"price": 3.0})[1]) is None


def test_version_on_a_write_means_what_it_means_on_events():
    _, old = apply(None, catalogue.CREATE, fields_of(user_id="u", name="n", version=5))
    assert apply(old, catalogue.PATCH, {"stock": 1, "version": 5}) == (catalogue.STALE, 5)
    outcome, new = apply(old, catalogue.PATCH, {"stock": 1, "version": 6})
    assert outcome == catalogue.OK and unpack(new).version == 6


def test_conditions_are_checked_against_the_state_the_write_lands_on():
    _, old = apply(None, catalogue.CREATE, fields_of(user_id="u", name="n"), rev=7)
    assert apply(old, catalogue.PATCH, {"stock": 1}, if_match=(6,)) == (catalogue.PRECONDITION_FAILED, 7)
    assert apply(old, catalogue.PATCH, {"stock": 1}, if_match=(6, 7))[0] == catalogue.OK
    assert apply(old, catalogue.DELETE, if_match=catalogue.ANY) == (catalogue.OK, None)
    assert apply(None, catalogue.DELETE, if_match=catalogue.ANY) == (catalogue.PRECONDITION_FAILED, None)
    assert apply(None, catalogue.DELETE) == (catalogue.NOT_FOUND, None)
    assert apply(old, catalogue.PUT, fields_of(user_id="u", name="n"), if_none_match=catalogue.ANY) == (
        catalogue.PRECONDITION_FAILED, 7)
    assert apply(None, catalogue.PUT, fields_of(user_id="u", name="n"), if_none_match=catalogue.ANY)[0] == (
        catalogue.CREATED)


# ---------------------------------------------------------------- input rules


def bad_pointers(doc, mode=product_input.CREATE, path_id=None) -> set[str]:
    with pytest.raises(Problem) as caught:
        product_input.product_fields(doc, mode, path_id)
    assert caught.value.status.startswith("422")
    return {error["pointer"] for error in caught.value.extra["errors"]}


def test_input_rules_name_every_bad_field():
    assert bad_pointers({"name": "n"}) == {"/user_id"}
    assert bad_pointers({"user_id": "u", "name": "", "colour": "red"}) == {"/name", "/colour"}
    assert bad_pointers({"user_id": "u/x", "name": "n" * 201}) == {"/user_id", "/name"}
    assert bad_pointers({"user_id": "u", "name": "a\x00b"}) == {"/name"}
    assert bad_pointers({"user_id": "u", "name": "n", "description": "d" * 5001}) == {"/description"}
    assert bad_pointers({"user_id": "u", "name": "n", "images": ["ftp://x/y", "/rel", "javascript:alert(1)",
                                                                 "https://ok/1", "https://ok/1", 5]}) == {
        "/images/0", "/images/1", "/images/2", "/images/4", "/images/5"}
    assert bad_pointers({"user_id": "u", "name": "n", "images": [f"https://x/{i}" for i in range(11)]}) == {"/images"}
    assert bad_pointers({"user_id": "u", "name": "n", "images": ["https://x/" + "a" * 2048]}) == {"/images/0"}
    assert bad_pointers({"user_id": "u", "name": "n", "price": -1, "stock": 1.5, "version": "3"}) == {
        "/price", "/stock", "/version"}
    assert bad_pointers({"product_id": "other", "user_id": "u", "name": "n"}, product_input.PUT, "p") == {"/product_id"}
    assert bad_pointers({"name": None}, product_input.PATCH) == {"/name"}


def test_a_put_sets_every_replaced_field_and_a_patch_only_the_given_ones():
    put = product_input.product_fields({"user_id": "u", "name": "n"}, product_input.PUT, "p")
    assert put == fields_of(user_id="u", name="n")
    patch = product_input.product_fields({"description": None, "price": 2}, product_input.PATCH, "p")
    assert patch == {"description": None, "price": 2.0}


def test_generated_ids_are_ulids_that_sort_by_time():
    ids = [product_input.new_product_id() for _ in range(50)]
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)
    assert len(set(ids)) == 50
    assert ids[0][:8] <= ids[-1][:8]  # the time part never goes back


# ---------------------------------------------------------------- big messages and big replies


@PROPS
@given(st.binary(min_size=0, max_size=40_000))
def test_a_body_of_any_size_travels_in_frames_that_each_fit_pipe_buf(payload):
    body = protocol.Write.pack(b"\0abcde", 7, catalogue.PUT, "p", {"description": payload.hex()[:20000]}, None, None)
    frames = protocol.message_frames(body, b"\0abcde", 7)
    assert all(len(frame) <= protocol.PIPE_BUF for frame in frames)
    bodies = protocol.FrameReader().feed(b"".join(frames))
    if len(frames) == 1:
        assert bodies == [body]
        return
    pieces = [msgpack.unpackb(b, raw=False, use_list=False) for b in bodies]
    assert all(piece[0] == protocol.PART and piece[2] == 7 for piece in pieces)
    assert [piece[3] for piece in pieces] == [False] * (len(pieces) - 1) + [True]
    assert b"".join(piece[4] for piece in pieces) == body


@pytest.mark.parametrize("size", [10, protocol.REPLY_PART, 5 * protocol.REPLY_PART + 3])
def test_a_reply_of_any_size_comes_back_whole(size):
    payload = [b"x" * size, None, 3]
    datagrams = protocol.reply_datagrams(99, payload)
    assert all(len(d) <= protocol.MAX_REPLY for d in datagrams)
    replies = [protocol.unpack_reply(d) for d in datagrams]
    if len(replies) == 1:
        assert replies == [[99, payload]]
        return
    assert [r[2] for r in replies] == list(range(len(replies) - 1, -1, -1))
    assert protocol.unpack_payload([r[1] for r in replies]) == payload


# ---------------------------------------------------------------- the shard's handlers


def _handle(shard: Shard, *bodies: bytes) -> bool:
    frames = b"".join(frame for body in bodies for frame in protocol.message_frames(body, b"\0a", 1))
    return shard.handle(protocol.FrameReader().feed(frames))


def test_the_shard_applies_writes_in_order_and_numbers_every_change():
    shard = RecordingShard()
    ids = itertools.count(1)
    address = b"\0abcde"
    create = protocol.Write.pack(address, next(ids), catalogue.CREATE, "p", fields_of(user_id="u", name="n"),
                                 None, None)
    events = protocol.events_frames([(0, protocol.pack_event("p", 3.0, None, None))], None, ids, 0)
    [(_, _, events_frame)] = list(events)
    _handle(shard, create)
    shard.handle(protocol.FrameReader().feed(events_frame))
    [(_, _, (outcome, created))] = shard.sent
    assert outcome == catalogue.CREATED and revision(created) == 1
    current = shard.store.get_packed("p")
    assert revision(current) == 2 and unpack(current).price == 3.0 and unpack(current).name == "n"
    stale_if = protocol.Write.pack(address, 9, catalogue.DELETE, "p", None, (1,), None)
    good_if = protocol.Write.pack(address, 10, catalogue.DELETE, "p", None, (2,), None)
    _handle(shard, stale_if, good_if)
    assert shard.sent[1:] == [(address, 9, [catalogue.PRECONDITION_FAILED, 2]), (address, 10, [catalogue.OK, None])]
    assert shard.store.get_packed("p") is None
    assert [(seq, pid, packed is None) for seq, pid, packed in shard.changes.entries] == [
        (1, "p", False), (2, "p", False), (3, "p", True)]
    assert shard.changes.head == 3


def test_a_write_too_big_for_one_frame_is_joined_from_its_parts_among_other_frames():
    shard = RecordingShard()
    address = b"\0abcde"
    big = fields_of(user_id="u", name="n", description="\U0001f600" * 5000,
                    images=tuple(f"https://img.example/{i}/" + "a" * 2000 for i in range(10)))
    body = protocol.Write.pack(address, 5, catalogue.CREATE, "big", big, None, None)
    frames = protocol.message_frames(body, address, 5)
    assert len(frames) >= 10
    other = protocol.get_frame(address, 6, "big")  # another writer's frame between the parts
    stream = b"".join(frames[:3]) + other + b"".join(frames[3:])
    shard.handle(protocol.FrameReader().feed(stream))
    assert shard.sent[0] == (address, 6, None)  # read before the write's last part arrived
    assert shard.sent[1][2][0] == catalogue.CREATED
    assert details(shard.store.get_packed("big"))[2] == big["description"]
    assert not shard.parts and shard.parts_bytes == 0


def test_get_many_answers_in_the_order_asked():
    shard = RecordingShard()
    _handle(shard, protocol.Write.pack(b"\0a", 1, catalogue.CREATE, "b", fields_of(user_id="u", name="n"), None, None))
    _handle(shard, protocol.GetMany.pack(b"\0a", 2, ("x", "b", "y")))
    records = shard.sent[-1][2]
    assert records[0] is None and records[2] is None and unpack(records[1]).name == "n"


def test_a_sync_shard_answers_a_write_only_after_its_commit(tmp_path):
    shard = RecordingShard(path=str(tmp_path / "shard-000.sqlite3"), durability="sync")
    _handle(shard, protocol.Write.pack(b"\0a", 1, catalogue.CREATE, "p", fields_of(user_id="u", name="n"), None, None))
    assert shard.sent == [] and len(shard.pending_acks) == 1
    assert shard.commit()
    assert shard.sent[0][2][0] == catalogue.CREATED
    _handle(shard, protocol.Write.pack(b"\0a", 2, catalogue.DELETE, "p", None, None, None))
    assert shard.commit()
    reopened = ShardFile(str(tmp_path / "shard-000.sqlite3"), sync=False)
    assert list(reopened.rows()) == []
    kept = [(seq, pid, packed is None) for seq, pid, packed in reopened.changes(10)[0]]
    assert kept == [(1, "p", False), (2, "p", True)]
    assert reopened.changes(10)[1] == {2: "u"}  # whose product the delete removed
    assert reopened.max_revision() == 0  # the product is gone; its changes are kept
    reopened.close()
    # A shard started on the file still matches the delete to its owner (the feed's user_id filter).
    again = RecordingShard(path=str(tmp_path / "shard-000.sqlite3"), durability="sync")
    again.load()
    assert [seq for seq, _, _ in again.changes.since(0, 10, "u", None, 100)[2]] == [1, 2]
    assert again.changes.since(0, 10, "v", None, 100)[2] == []


def test_a_schema_2_file_is_upgraded_and_keeps_its_history(tmp_path):
    path = str(tmp_path / "shard-000.sqlite3")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE products (id TEXT PRIMARY KEY, price REAL, stock INTEGER, version INTEGER,
            updated_at_ns INTEGER NOT NULL, created_at_ns INTEGER, revision INTEGER NOT NULL DEFAULT 0,
            user_id TEXT, name TEXT, description TEXT, images TEXT) WITHOUT ROWID;
        CREATE TABLE changes (seq INTEGER PRIMARY KEY, product_id TEXT NOT NULL, record BLOB);
        PRAGMA user_version=2;
    """)
    db.execute("INSERT INTO changes VALUES (1, 'p', NULL)")
    db.commit()
    db.close()
    f = ShardFile(path, sync=False)
    assert f.changes(10) == ([(1, "p", None)], {})
    f.save([], [(2, "q", None)], owners={2: "u"})
    f.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4  # on to the image results' schema too
    db.close()
    assert ShardFile(path, sync=False).changes(10) == ([(1, "p", None), (2, "q", None)], {2: "u"})


def test_details_survive_the_shard_file(tmp_path):
    path = str(tmp_path / "shard-000.sqlite3")
    f = ShardFile(path, sync=False)
    full = pack_fields(1.5, 3, None, 10, 5, 7, DETAILS)
    f.save([("p", full), ("q", pack_fields(None, 1, None, 2))])
    f.close()
    again = ShardFile(path, sync=False)
    assert dict(again.rows()) == {"p": full, "q": pack_fields(None, 1, None, 2)}
    assert again.max_revision() == 7


def test_the_checkpointer_keeps_the_wal_bounded_while_commits_go_on(tmp_path, monkeypatch):
    """With SQLite's own checkpoints off (they ran inside commits), the shard's checkpointer thread
    folds the WAL back into the file: without it, this WAL grows past 100 MB."""
    import os
    import random
    import time

    from productd.store import sqlite

    monkeypatch.setattr(sqlite, "CHECKPOINT_EVERY", 0.05)
    path = str(tmp_path / "shard-000.sqlite3")
    f = ShardFile(path, sync=False)
    records = [(f"m{i:011d}", pack_fields(1.0, i, None, i, i, i)) for i in range(50_000)]
    f.save(records)
    f.start_checkpointer()
    most = 0
    for turn in range(60):  # each commit changes what it writes: SQLite skips a row written unchanged
        f.save([(pid, pack_fields(float(turn), 1, None, turn, 0, turn)) for pid, _ in random.sample(records, 1000)])
        time.sleep(0.02)
        most = max(most, os.path.getsize(path + "-wal"))
    f.close()
    # Every commit here rewrites most pages back to back: the forced checkpoints bound the WAL.
    assert most < sqlite.CHECKPOINT_FORCE_BYTES + 8 * 1024 * 1024, most
    assert not os.path.exists(path + "-wal")  # the last close folded it in
    assert len(list(ShardFile(path, sync=False).rows())) == 50_000
