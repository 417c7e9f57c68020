"""Shard files that a crash left with a WAL start, and a refused start leaves them as they were.

SQLite in WAL mode keeps recent commits in `shard-NNN.sqlite3-wal` until a checkpoint folds them
into the file. A kill -9 (or a checkpoint cut short by a full disk) leaves a file that only makes
sense together with its WAL. productd's start-up check must read it the way SQLite does, and
must not change the file or its WAL while it looks.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest
from service import uid
from test_datadir import changes, refused_start, tree_state

SHARDS = 4
PRODUCTS = 400
WAL_HEADER = 32
FRAME_HEADER = 24


def crashed_data_dir(start_service, tmp_path: Path) -> tuple[Path, dict[str, float]]:
    """A data dir whose service was killed with SIGKILL, every process at once, after sync writes."""
    data = tmp_path / "data"
    svc = start_service(shards=SHARDS, workers=1, extra_args=["--data-dir", str(data)],
                        env={"PRODUCTD_DURABILITY": "sync"})
    prefix = uid("wal")
    prices = {f"{prefix}-{i}": float(i) for i in range(PRODUCTS)}
    items = [{"product_id": pid, "price": price, "version": 1} for pid, price in prices.items()]
    for start in range(0, PRODUCTS, 50):
        r = svc.post(items[start : start + 50])
        assert r.status_code == 202, r.text  # sync: committed before the 202
    svc.kill()
    wals = sorted(data.glob("layout-*/shard-*.sqlite3-wal"))
    assert wals and any(w.stat().st_size > 0 for w in wals), "the crash left no WAL to test with"
    return data, prices


def shard_files(data: Path) -> list[Path]:
    return sorted(data.glob("layout-*/shard-*.sqlite3"))


def assert_every_product(svc, prices: dict[str, float]) -> None:
    missing = [pid for pid, price in prices.items() if svc.get(pid).json().get("price") != price]
    assert not missing, f"{len(missing)} committed products missing after the restart, e.g. {missing[:3]}"


def test_start_after_kill_9_with_the_wal_in_place(start_service, tmp_path):
    data, prices = crashed_data_dir(start_service, tmp_path)
    again = start_service(shards=SHARDS, workers=1, extra_args=["--data-dir", str(data)],
                          env={"PRODUCTD_DURABILITY": "sync"})
    assert_every_product(again, prices)
    assert again.stop() == 0, again.log_tail()


def cut_checkpoint_short(db: Path) -> None:
    """Copy the newest page 1 from the WAL into the file, as a checkpoint does first, and stop there.

    The file's header then counts pages that only the WAL holds: what a checkpoint that ran out of
    disk leaves. SQLite, which reads the WAL, opens it; reading the file alone finds it malformed.
    """
    wal = db.with_name(db.name + "-wal").read_bytes()
    page_size = struct.unpack(">I", wal[8:12])[0]
    newest = None
    for offset in range(WAL_HEADER, len(wal) - FRAME_HEADER - page_size + 1, FRAME_HEADER + page_size):
        if struct.unpack(">I", wal[offset : offset + 4])[0] == 1:
            newest = wal[offset + FRAME_HEADER : offset + FRAME_HEADER + page_size]
    assert newest is not None, f"no page 1 in the WAL of {db}"
    with open(db, "r+b") as f:
        f.write(newest)


def test_start_after_a_checkpoint_cut_short(start_service, tmp_path):
    data, prices = crashed_data_dir(start_service, tmp_path)
    cut = [db for db in shard_files(data) if db.with_name(db.name + "-wal").stat().st_size > 0]
    for db in cut:
        cut_checkpoint_short(db)
    # The case the start-up check used to refuse: the file without its WAL is not consistent.
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        probe = sqlite3.connect(f"file:{cut[0]}?mode=ro&immutable=1", uri=True)
        probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
    again = start_service(shards=SHARDS, workers=1, extra_args=["--data-dir", str(data)],
                          env={"PRODUCTD_DURABILITY": "sync"})
    assert_every_product(again, prices)
    assert again.stop() == 0, again.log_tail()


def test_refused_start_leaves_files_with_a_wal_untouched(start_service, tmp_path):
    """The check reads shards 0-2 with their WALs before it refuses shard 3: no byte of any file or
    WAL changes, and the `-shm` index the read-only open needs is removed again."""
    data, _ = crashed_data_dir(start_service, tmp_path)
    for shm in data.glob("layout-*/*-shm"):
        shm.unlink()
    last = shard_files(data)[-1]
    last.write_bytes(b"not a database, the operator's mistake\n" * 200)
    last.with_name(last.name + "-wal").unlink(missing_ok=True)  # with its WAL, SQLite would still read it
    before, names = tree_state(data), sorted(p.name for p in data.rglob("*"))
    assert any(name.endswith("-wal") for name in names)
    refusal = refused_start(tmp_path / "cwd", data, shards=SHARDS)
    assert refusal.code == 2 and str(last) in refusal.message, refusal
    assert "is not a usable productd shard file" in refusal.message, refusal.message
    assert not changes(before, tree_state(data)), changes(before, tree_state(data))
    assert sorted(p.name for p in data.rglob("*")) == names, "the check left files behind"
