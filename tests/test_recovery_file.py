"""The recovery file on its own (pure file logic, no service): what a stop saves is what a start reads."""

from __future__ import annotations

import pytest

from productd.store import recovery
from productd.store.record import pack_fields

RECORDS = [(f"p-{i}", pack_fields(float(i), i, i + 1, 1_700_000_000_000_000_000 + i)) for i in range(500)]


def test_path_sits_beside_the_shard_file():
    assert recovery.path_for("/d/layout-1-4/shard-003.sqlite3") == "/d/layout-1-4/shard-003.recovery"


def test_no_file_and_a_reserved_file_both_read_empty(tmp_path):
    path = str(tmp_path / "shard-000.recovery")
    assert recovery.read(path) == []
    recovery.RecoveryFile(path).reserve(128 * 1024)
    assert (tmp_path / "shard-000.recovery").stat().st_size >= 128 * 1024
    assert recovery.read(path) == []


def test_saved_records_read_back_and_clear_keeps_the_room(tmp_path):
    path = str(tmp_path / "shard-000.recovery")
    room = recovery.RecoveryFile(path)
    room.reserve(64 * 1024)
    assert room.save(RECORDS) == len(RECORDS)
    assert recovery.read(path) == RECORDS
    size = (tmp_path / "shard-000.recovery").stat().st_size
    room.clear()
    assert recovery.read(path) == []
    assert (tmp_path / "shard-000.recovery").stat().st_size == size


def test_records_larger_than_the_reserve_grow_the_file(tmp_path):
    path = str(tmp_path / "shard-000.recovery")
    room = recovery.RecoveryFile(path)
    room.reserve(4096)
    many = RECORDS * 20
    room.save(many)
    assert recovery.read(path) == many


def test_a_newer_save_replaces_an_older_one(tmp_path):
    path = str(tmp_path / "r.recovery")
    room = recovery.RecoveryFile(path)
    room.save(RECORDS)
    room.save(RECORDS[:3])
    assert recovery.read(path) == RECORDS[:3]


@pytest.mark.parametrize("offset", [0, 9, 17, recovery.HEADER_SIZE + 5])
def test_a_damaged_file_is_refused_with_its_name(tmp_path, offset):
    path = tmp_path / "shard-001.recovery"
    recovery.RecoveryFile(str(path)).save(RECORDS)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(recovery.RecoveryFileError, match="shard-001.recovery"):
        recovery.read(str(path))


def test_a_truncated_payload_is_refused(tmp_path):
    path = tmp_path / "shard-001.recovery"
    recovery.RecoveryFile(str(path)).save(RECORDS)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(recovery.RecoveryFileError, match="damaged"):
        recovery.read(str(path))


def test_a_reshard_waits_until_the_recovery_files_are_committed(tmp_path):
    from productd.actors.routing import shard_for
    from productd.store.datadir import DataDir, DataDirError
    from productd.store.sqlite import ShardFile

    data = DataDir(str(tmp_path / "data"))
    data.lock()
    layout, shards = data.prepare(2, 4, False, shard_for)
    for shard in range(shards):
        ShardFile(data.shard_path(layout, shard), sync=False).close()
    pending = recovery.path_for(data.shard_path(layout, 1))
    recovery.RecoveryFile(pending).save(RECORDS[:1])
    with pytest.raises(DataDirError, match="start once with --shards 2"):
        data.prepare(3, 4, True, shard_for)
    assert data.read_meta()["shards"] == 2
    recovery.RecoveryFile(pending).clear()
    assert data.prepare(3, 4, True, shard_for)[1] == 3


@pytest.mark.parametrize("length", [2**63, 2**40, 2**33])
def test_a_header_with_a_huge_length_is_refused_not_read(tmp_path, length):
    path = tmp_path / "shard-001.recovery"
    recovery.RecoveryFile(str(path)).save(RECORDS[:2])
    data = bytearray(path.read_bytes())
    data[8:16] = length.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(recovery.RecoveryFileError, match="damaged"):
        recovery.read(str(path))
