"""productd.cluster.pgstore against the real PostgreSQL on this machine (PRODUCTD_TEST_DATABASE,
default postgresql://postgres@127.0.0.1:5432/test): migrations, fencing, the guarded upsert
against a brute-force model, load packing as the SQLite file does. Each test works in a schema
of its own (search_path), dropped afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

pytest.importorskip("psycopg", reason="the cluster extra is not installed: pip install 'productd[cluster]'")
import psycopg  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from productd.cluster import pgstore  # noqa: E402
from productd.store.record import pack_fields, unpack, with_image_result  # noqa: E402
from productd.store.sqlite import ShardFile  # noqa: E402

URL = os.environ.get("PRODUCTD_TEST_DATABASE", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    psycopg.connect(URL, connect_timeout=10).close()
except psycopg.Error as exc:
    pytest.skip(f"PostgreSQL at {URL} does not answer ({exc}); start it with "
                "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`",
                allow_module_level=True)


def _schema_url(schema: str) -> str:
    # libpq's options: every connection of a child process lands in the test's schema too.
    sep = "&" if "?" in URL else "?"
    return f"{URL}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture
def schema():
    name = f"test_{uuid.uuid4().hex[:12]}"
    with pgstore.connect(URL) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        with pgstore.connect(URL) as admin:
            admin.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
def conn(schema):
    with pgstore.connect(_schema_url(schema)) as connection:
        yield connection


def _tables(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}


# ---- migrations

def test_migrate_a_fresh_database(conn):
    assert pgstore.migrate(conn, 4, "shop") == (0, pgstore.SCHEMA_VERSION)
    assert {"schema_version", "cluster", "products", "shard_owners"} <= _tables(conn)
    assert conn.execute("SELECT name, shards FROM cluster").fetchone() == ("shop", 4)
    assert pgstore.PgStore(conn).owners() == [(k, 0, None) for k in range(4)]
    pgstore.check(conn, 4, "shop")


def test_migrate_is_idempotent(conn):
    pgstore.migrate(conn, 4)
    store = pgstore.PgStore(conn)
    epoch = store.take(1, "a")
    store.save(1, epoch, [("p", pack_fields(1.0, 2, 3, 10))])
    assert pgstore.migrate(conn, 4) == (pgstore.SCHEMA_VERSION, pgstore.SCHEMA_VERSION)
    assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == pgstore.SCHEMA_VERSION
    assert [k for k, _ in store.load(1)] == ["p"] and store.owners()[1][1:] == (epoch, "a")


def test_a_newer_schema_is_refused_and_left_alone(conn):
    pgstore.migrate(conn, 2)
    conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (pgstore.SCHEMA_VERSION + 1,))
    with pytest.raises(pgstore.SchemaTooNew, match="newer than this productd"):
        pgstore.migrate(conn, 2)
    with pytest.raises(pgstore.SchemaTooNew):
        pgstore.check(conn, 2)
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == pgstore.SCHEMA_VERSION + 1


def test_another_layout_is_refused_and_nothing_written(conn):
    pgstore.migrate(conn, 4, "shop")
    for shards, name in ((8, "shop"), (4, "other")):
        with pytest.raises(pgstore.LayoutMismatch, match="cluster 'shop' with 4 shards"):
            pgstore.migrate(conn, shards, name)
        with pytest.raises(pgstore.LayoutMismatch):
            pgstore.check(conn, shards, name)
    assert conn.execute("SELECT count(*) FROM shard_owners").fetchone()[0] == 4


def test_check_refuses_an_unmigrated_database(conn):
    with pytest.raises(pgstore.DatabaseError, match="run productd migrate"):
        pgstore.check(conn, 4)
    assert "cluster" not in _tables(conn)


def test_productd_migrate_command(schema):
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "productd", "migrate", "--database", _schema_url(schema), "--shards", "3"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"0 -> {pgstore.SCHEMA_VERSION}" in first.stdout
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    other = subprocess.run([*command[:-1], "5"], env=env, capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and "3 shards" in other.stderr
    bad = subprocess.run([*command[:4], "--database", "postgresql://postgres@127.0.0.1:1/none", "--shards", "3"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "productd migrate:" in bad.stderr


# ---- fencing

def test_a_fenced_owner_writes_nothing(conn):
    pgstore.migrate(conn, 2)
    a, b = pgstore.PgStore(conn), pgstore.PgStore(conn)
    assert a.take(0, "host-a") == 1
    a.save(0, 1, [("x", pack_fields(1.0, 1, None, 10, revision=1))], seq=1)
    assert b.take(0, "host-b") == 2
    with pytest.raises(pgstore.Fenced) as refused:
        a.save(0, 1, [("x", pack_fields(9.0, 9, None, 20, revision=2)),
                      ("y", pack_fields(9.0, 9, None, 20, revision=3)), ("gone", None)], seq=3)
    assert refused.value.shard == 0 and refused.value.epoch == 1
    assert {k: unpack(v).price for k, v in b.load(0)} == {"x": 1.0}
    assert b.head(0) == 1
    b.save(0, 2, [("y", pack_fields(2.0, 2, None, 30, revision=2))], seq=2)
    assert {k: unpack(v).price for k, v in b.load(0)} == {"x": 1.0, "y": 2.0}
    assert b.owners()[0] == (0, 2, "host-b")


def test_a_save_waiting_behind_a_take_is_fenced(schema, conn):
    """B's take holds the owner row; A's save, sent before B commits, waits for it and must then
    find the epoch changed: Fenced, nothing written."""
    pgstore.migrate(conn, 1)
    epoch = pgstore.PgStore(conn).take(0, "a")
    outcome: list = []

    def save_as_a():
        with pgstore.connect(_schema_url(schema)) as own:
            try:
                pgstore.PgStore(own).save(0, epoch, [("x", pack_fields(1.0, 1, None, 1, revision=1))])
                outcome.append("saved")
            except pgstore.Fenced as exc:
                outcome.append(exc)

    with pgstore.connect(_schema_url(schema)) as other:
        with other.transaction():
            assert pgstore.PgStore(other).take(0, "b") == epoch + 1
            saver = threading.Thread(target=save_as_a)
            saver.start()
            deadline = time.monotonic() + 30
            while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND query LIKE 'UPDATE shard_owners SET seq%%'").fetchone()[0]:
                assert time.monotonic() < deadline and saver.is_alive(), outcome
                time.sleep(0.02)
        saver.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], pgstore.Fenced), outcome
    assert list(pgstore.PgStore(conn).load(0)) == []


# ---- the upsert against a brute-force model

ids = st.sampled_from(["a", "b", "c", "d"])
names = st.text(st.characters(exclude_characters="\x00"), max_size=5)  # the edge refuses NUL (control characters)


@st.composite
def batches(draw):
    """Batches of changes stamped as an owner stamps them (one revision counter for every change,
    deletes included), then in an order of arrival the guard must cope with: shuffled, some
    replayed. Each batch is (changes as (id, packed or None, revision), seq after it)."""
    revision = 0
    made = []
    for _ in range(draw(st.integers(1, 5))):
        batch = []
        for product_id in draw(st.lists(ids, max_size=6)):
            revision += 1
            if draw(st.integers(0, 3)) == 0:
                batch.append((product_id, None, revision))
            else:
                price = draw(st.none() | st.floats(0, 1e6))
                details = draw(st.none() | st.tuples(st.just("u"), names, st.none() | names,
                                                     st.lists(st.just("https://x/i.png"), max_size=2)))
                batch.append((product_id, pack_fields(price, revision, None, revision * 10, 1, revision, details),
                              revision))
        made.append((batch, revision))
    order = draw(st.permutations(range(len(made))))
    replays = draw(st.lists(st.sampled_from(range(len(made))), max_size=2))
    return [made[i] for i in [*order, *replays]]


def model(arrivals) -> dict[str, bytes]:
    """What the rows must be, by brute force: per product, its change of the highest revision
    among everything that arrived, in whatever order; absent if that change is a delete."""
    latest: dict[str, tuple[int, bytes | None]] = {}
    for batch, _ in arrivals:
        for product_id, packed, revision in batch:
            if product_id not in latest or revision > latest[product_id][0]:
                latest[product_id] = (revision, packed)
    return {k: packed for k, (_, packed) in latest.items() if packed is not None}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals=batches())
def test_upsert_matches_brute_force(conn, arrivals):
    conn.execute("DROP TABLE IF EXISTS schema_version, cluster, products, shard_owners")
    pgstore.migrate(conn, 2)
    store = pgstore.PgStore(conn)
    epoch = store.take(1, "owner")
    for batch, seq in arrivals:
        store.save(1, epoch, [(product_id, packed) for product_id, packed, _ in batch], seq=seq)
    assert dict(store.load(1)) == model(arrivals)
    assert list(store.load(0)) == []  # another shard's rows are never touched


def test_a_key_twice_in_one_batch_keeps_the_last(conn):
    pgstore.migrate(conn, 1)
    store = pgstore.PgStore(conn)
    epoch = store.take(0, "o")
    first, last = pack_fields(1.0, 1, 1, 10, revision=1), pack_fields(2.0, 2, 2, 20, revision=2)
    third = pack_fields(3.0, 3, 3, 30, revision=3)
    assert store.save(0, epoch, [("p", first), ("q", None), ("p", last), ("q", third)]) == 2
    assert dict(store.load(0)) == {"p": last, "q": third}
    assert store.save(0, epoch, [("q", pack_fields(4.0, 4, 4, 40, revision=4)), ("q", None)], seq=5) == 1
    assert dict(store.load(0)) == {"p": last}
    assert store.head(0) == 5  # the counter survives a delete of the newest product


def test_load_packs_as_the_sqlite_shard_file_does(conn, tmp_path):
    """The same records through PostgreSQL and through an SQLite shard file come back byte for byte."""
    pgstore.migrate(conn, 1)
    store = pgstore.PgStore(conn)
    records = [
        ("bare", pack_fields(49.99, 100, 7, 1_700_000_000_000_000_000, revision=3)),
        ("unset", pack_fields(None, None, None, 5, 4, revision=4)),
        ("described", pack_fields(1.5, 0, None, 20, 10, 5, ("user-1", "Näme", None, ("https://a/1.png", "https://a/2")))),
        ("empty-images", pack_fields(0.0, 1, 2, 30, 30, 6, ("u", "n", "d", ()))),
        ("extremes", pack_fields(1e300, 2**63 - 1, 2**63 - 1, 2**62, 1, 7, None)),
        ("imaged", with_image_result(pack_fields(2.0, 1, None, 40, 40, 8, ("u", "n", None, ("https://a/1", "https://a/2"))),
                                     "https://a/1", ("done", "ab" * 32 + ".webp", "webp", 10, 20, 300), 41, 9)),
    ]
    store.save(0, store.take(0, "o"), records)
    shard_file = ShardFile(str(tmp_path / "shard.sqlite3"), sync=False)
    try:
        shard_file.save(records)
        assert sorted(store.load(0)) == sorted(shard_file.rows()) == sorted(records)
    finally:
        shard_file.close()
