"""A shard that cannot commit refuses writes with 503, says why, keeps serving reads and retries.

The failure is real, not injected: the test holds SQLite's write lock on one shard file, as an
operator's open transaction in the sqlite3 shell would, so the shard's commits fail with
"database is locked" until the test lets go.
"""

from __future__ import annotations

import sqlite3
import zlib

import pytest
from service import uid

SHARDS = 2


def owner(product_id: str) -> int:
    return zlib.crc32(product_id.encode()) % SHARDS


def ids_on(shard: int, label: str, count: int) -> list[str]:
    out = []
    while len(out) < count:
        candidate = uid(label)
        if owner(candidate) == shard:
            out.append(candidate)
    return out


def shard_file(data_dir) -> str:
    (layout,) = [p for p in data_dir.iterdir() if p.name.startswith("layout-")]
    return str(layout / "shard-000.sqlite3")


def hold_write_lock(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # the one write lock of a WAL database
    return db


@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_failing_commits_refuse_writes_keep_reads_and_recover(start_service, tmp_path, durability):
    data_dir = tmp_path / "data"
    svc = start_service(
        shards=SHARDS, workers=2,
        extra_args=["--data-dir", str(data_dir), "--commit-interval", "0.05"],
        env={"PRODUCTD_DURABILITY": durability},
    )
    stuck, other = ids_on(0, "locked", 2), ids_on(1, "free", 1)
    assert svc.post({"product_id": stuck[0], "price": 1.0, "version": 1}).status_code == 202

    lock = hold_write_lock(shard_file(data_dir))
    try:
        first = svc.post({"product_id": stuck[0], "price": 2.0, "version": 2})
        if durability == "sync":
            # Nothing uncommitted is acknowledged: the shard could not commit this event.
            assert first.status_code == 503, first.text
            assert first.json()["not_accepted"] == [0]
            assert "could not commit" in first.json()["detail"]
        else:
            assert first.status_code == 202, first.text  # batch acknowledges on enqueue
        svc.wait_for(lambda: svc.metrics()[("productd_shard_writes_refused", "0")] == 1,
                     "shard 0 to refuse writes")
        refused = svc.post([{"product_id": stuck[1], "stock": 5}, {"product_id": other[0], "stock": 6}])
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"]
        assert refused.json()["not_accepted"] == [0]  # shard 1 took its item
        assert refused.json()["accepted"] == 1
        assert "cannot commit to disk" in refused.json()["detail"]
        assert svc.get(stuck[0]).status_code == 200  # reads keep working
        assert svc.get(other[0]).json()["stock"] == 6
        assert svc.wait_for(lambda: "cannot commit to" in svc.log_text(), "the log to say why")
    finally:
        lock.rollback()
        lock.close()

    svc.wait_for(lambda: svc.metrics()[("productd_shard_writes_refused", "0")] == 0,
                 "shard 0 to commit again after the lock is gone")
    assert "commits again; taking writes" in svc.log_text()
    assert svc.post({"product_id": stuck[1], "stock": 7}).status_code == 202
    assert svc.stop() == 0
    again = start_service(
        shards=SHARDS, workers=2, extra_args=["--data-dir", str(data_dir)],
        env={"PRODUCTD_DURABILITY": durability},
    )
    # The event refused in sync mode was applied in memory all the same and committed on retry:
    # 503 says "not confirmed", and a client resending it is harmless thanks to its version.
    assert again.product(stuck[0])["version"] == 2
    assert again.product(stuck[1])["stock"] == 7
    assert again.product(other[0])["stock"] == 6
