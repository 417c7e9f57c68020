"""Bad data directories: the real `productd serve` refuses each one with exit code 2, a log line
`cannot start: ...` on stderr that names the file or directory, no process left behind, and the
operator's files exactly as they were (bytes and mtimes).

Two files are not compared: productd.lock, which productd writes its pid into whenever it takes
the lock (it holds no data), and SQLite's `-shm` wal-index, a scratch file rebuilt on every open.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from service import POLL, Productd, free_port, kill_session, service_env, session_leftovers, uid

REFUSAL_DEADLINE = 60.0  # only so a start that hangs fails instead of blocking the suite
NOT_COMPARED_SUFFIXES = ("productd.lock", "-shm")


# ---------------------------------------------------------------- helpers (also used by test_durability)


@dataclass
class Refusal:
    code: int
    stderr: str
    pid: int
    message: str  # the `cannot start: ...` message


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _startup_error(stderr: str) -> str:
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"message": line}
        message = entry.get("message", "") if isinstance(entry, dict) else ""
        if "cannot start:" in message:
            return message
    return ""


def refused_start(cwd: Path, data_dir: Path, *args: str, durability: str = "batch", shards: int = 4) -> Refusal:
    """Run `productd serve` on `data_dir`, expecting it to refuse to start.

    Fails (and kills it) if it starts serving instead; checks that nothing of it is left running.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        sys.executable, "-m", "productd", "serve",
        "--bind", f"127.0.0.1:{port}", "--workers", "1", "--shards", str(shards),
        "--data-dir", str(data_dir), *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, env=service_env(durability), cwd=cwd,
    )  # fmt: skip
    try:
        end = time.monotonic() + REFUSAL_DEADLINE
        while proc.poll() is None:
            if _listening(port) or time.monotonic() > end:
                raise AssertionError(f"productd did not refuse {data_dir}: still running after {REFUSAL_DEADLINE}s "
                                     f"or listening on {port}")
            time.sleep(POLL)
        out, err = proc.communicate(timeout=REFUSAL_DEADLINE)
    finally:
        if proc.poll() is None:
            kill_session(proc)
            proc.communicate()
    stderr = err.decode(errors="replace")
    left = session_leftovers(proc.pid, 10)
    assert left == [], f"processes left behind by a refused start: {left}"
    return Refusal(proc.returncode, stderr, proc.pid, _startup_error(stderr))


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (or `root` itself if it is a file): kind, sha256, size, mtime."""
    root = Path(root)
    state: dict[str, tuple] = {}
    paths = [root] if not root.is_dir() else sorted(root.rglob("*"))
    for path in paths:
        rel = str(path.relative_to(root)) if path != root else "."
        if rel.endswith(NOT_COMPARED_SUFFIXES):
            continue
        st = path.lstat()
        if path.is_dir():
            state[rel] = ("dir",)
        else:
            state[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return state


def changes(before: dict, after: dict) -> list[str]:
    out = []
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) != after.get(name):
            out.append(f"{name}: {before.get(name)} -> {after.get(name)}")
    return out


def assert_refused(refusal: Refusal, names: Path | str) -> None:
    assert refusal.code == 2, f"exit code {refusal.code}, expected 2\n{refusal.stderr[-3000:]}"
    assert refusal.message, f"no 'cannot start:' line on stderr\n{refusal.stderr[-3000:]}"
    assert str(names) in refusal.message, f"the message does not name {names}: {refusal.message}"


def committed_rows(data_dir: Path) -> dict[str, tuple]:
    """What the shard files hold, read the way an operator would (read-only sqlite)."""
    meta = json.loads((Path(data_dir) / "productd.json").read_bytes())
    rows: dict[str, tuple] = {}
    for shard in range(meta["shards"]):
        path = Path(data_dir) / meta["layout"] / f"shard-{shard:03d}.sqlite3"
        rows.update(shard_rows(path))
    return rows


def shard_rows(path: Path) -> dict[str, tuple]:
    for attempt in range(50):
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            return {r[0]: r[1:] for r in db.execute("SELECT id, price, stock, version, updated_at_ns FROM products")}
        except sqlite3.OperationalError:  # busy while the service writes: a moment later
            if attempt == 49:
                raise
            time.sleep(0.05)
        finally:
            db.close()
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- a data dir written by the real service


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A data dir as a graceful stop leaves it: 4 shards, products in each."""
    base = tmp_path_factory.mktemp("pristine")
    data = base / "data"
    svc = Productd(base / "svc", shards=4, workers=1, extra_args=["--data-dir", str(data)],
                   env={"PRODUCTD_DURABILITY": "batch"})
    try:
        svc.start()
        prefix = uid("dd")
        r = svc.post([{"product_id": f"{prefix}-{i}", "price": i + 0.5, "stock": i, "version": i} for i in range(200)])
        assert r.status_code == 202, r.text
        assert svc.stop() == 0, svc.log_tail()
    finally:
        svc.kill()
    for shard in range(4):
        assert (data / "layout-1-4" / f"shard-{shard:03d}.sqlite3").is_file()
    assert len(committed_rows(data)) == 200
    return data


@pytest.fixture
def data_copy(pristine, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(pristine, data)  # copy2: bytes and mtimes
    return data


def check_refused_untouched(tmp_path: Path, data: Path, names: Path, *args: str) -> Refusal:
    before = tree_state(data)
    refusal = refused_start(tmp_path / "cwd", data, *args)
    assert_refused(refusal, names)
    diff = changes(before, tree_state(data))
    assert not diff, "a refused start changed the data dir:\n" + "\n".join(diff)
    return refusal


# ---------------------------------------------------------------- the cases


def test_data_dir_that_is_a_regular_file(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    path = parent / "data"
    path.write_bytes(b"an operator's file, not a data dir\n")
    before = tree_state(parent)
    refusal = refused_start(tmp_path / "cwd", path)
    assert_refused(refusal, path)
    assert "not a directory" in refusal.message
    assert not changes(before, tree_state(parent)), changes(before, tree_state(parent))
    assert sorted(p.name for p in parent.iterdir()) == ["data"]


def test_data_dir_in_use_by_a_running_productd(start_service, tmp_path):
    data = tmp_path / "data"
    first = start_service(shards=4, workers=1, extra_args=["--data-dir", str(data)],
                          env={"PRODUCTD_DURABILITY": "sync"})
    prefix = uid("lock")
    r = first.post([{"product_id": f"{prefix}-{i}", "price": 1.5, "stock": i, "version": 1} for i in range(20)])
    assert r.status_code == 202, r.text  # sync: committed, so the files are quiet from here on
    shard_pids = first.shard_pids()
    record = first.product(f"{prefix}-3")

    refusal = check_refused_untouched(tmp_path, data, data)
    assert "in use" in refusal.message, refusal.message
    assert str(first.pid) in refusal.message, f"the message should name the holder's pid: {refusal.message}"

    # The first one never noticed.
    assert first.readyz().status_code == 200
    assert first.shard_pids() == shard_pids
    assert first.product(f"{prefix}-3") == record
    r = first.post({"product_id": f"{prefix}-3", "stock": 99, "version": 2})
    assert r.status_code == 202, r.text
    assert first.product(f"{prefix}-3")["stock"] == 99
    assert first.stop() == 0, first.log_tail()
    first.assert_no_leftovers()


def test_metadata_from_a_newer_format(data_copy, tmp_path):
    meta = data_copy / "productd.json"
    meta.write_text(json.dumps({"format": 99, "shards": 4, "layout": "layout-1-4"}) + "\n")
    refusal = check_refused_untouched(tmp_path, data_copy, meta)
    assert "newer" in refusal.message and "99" in refusal.message, refusal.message


@pytest.mark.parametrize(
    "content",
    [b'{"format": 1, "shards": 4, "lay', b"\x00\xffgarbage\x13\x37" * 10, b'["format", 1]'],
    ids=["truncated-json", "binary-garbage", "json-but-not-metadata"],
)
def test_corrupt_metadata(data_copy, tmp_path, content):
    meta = data_copy / "productd.json"
    meta.write_bytes(content)
    check_refused_untouched(tmp_path, data_copy, meta)


def test_corrupt_shard_file(data_copy, tmp_path):
    shard = data_copy / "layout-1-4" / "shard-001.sqlite3"
    shard.write_bytes(bytes((i * 131 + 7) % 256 for i in range(shard.stat().st_size or 8192)))
    check_refused_untouched(tmp_path, data_copy, shard)


def test_missing_shard_file(data_copy, tmp_path):
    shard = data_copy / "layout-1-4" / "shard-002.sqlite3"
    shard.unlink()
    refusal = check_refused_untouched(tmp_path, data_copy, shard)
    assert "missing" in refusal.message, refusal.message


def test_shard_file_from_a_newer_schema(data_copy, tmp_path):
    shard = data_copy / "layout-1-4" / "shard-000.sqlite3"
    db = sqlite3.connect(shard)
    db.execute("PRAGMA user_version=99")  # far newer than any productd so far
    db.close()  # the last connection: the WAL is checkpointed into the file and removed
    refusal = check_refused_untouched(tmp_path, data_copy, shard)
    assert "newer" in refusal.message, refusal.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_metadata(data_copy, tmp_path):
    meta = data_copy / "productd.json"
    meta.chmod(0)
    try:
        check_refused_untouched(tmp_path, data_copy, meta)
    finally:
        meta.chmod(0o644)
