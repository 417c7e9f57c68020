"""The durable copy of one shard: an SQLite file in WAL mode, one row per product, and the
shard's recent changes (the change feed's history).

Product columns are plain SQL types so an operator can read a shard with the sqlite3 shell:

    sqlite3 data/layout-1-4/shard-000.sqlite3 \
        "SELECT id, name, price, stock, version, datetime(updated_at_ns / 1e9, 'unixepoch') FROM products LIMIT 5"

A change row holds the product's packed record after the change (productd.store.record; NULL
for a delete, with the deleted product's owner beside it). Schema 1 (before the catalogue) and 2
(before deletes kept their owner and reshards their history) and 3 (before the image results'
column, image_results) are upgraded in place at the first start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from urllib.parse import quote

from productd.store.record import columns, pack_fields

SCHEMA_VERSION = 4  # 3: a delete's owner in changes; 4: image_results
BUSY_TIMEOUT = 1.0  # seconds
# The shard's checkpointer folds the WAL into the file off the shard's loop once the WAL holds
# this much, looking every CHECKPOINT_EVERY seconds. SQLite's own checkpoint (every 1,000 pages,
# inside a commit, with its fsyncs) made a commit of 1,000 changed products into a
# 250,000-product file cost 27 ms instead of 10.
CHECKPOINT_WAL_BYTES = 4 << 20
CHECKPOINT_EVERY = 0.5
CHECKPOINT_FORCE_BYTES = 64 << 20
log = logging.getLogger("productd.store")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    id TEXT PRIMARY KEY,
    price REAL,            -- NULL: never set
    stock INTEGER,         -- NULL: never set
    version INTEGER,       -- NULL: never set
    updated_at_ns INTEGER NOT NULL,
    created_at_ns INTEGER,         -- NULL: written by schema 1, use updated_at_ns
    revision INTEGER NOT NULL DEFAULT 0,
    user_id TEXT,          -- NULL for a bare product (events only), with name, description, images
    name TEXT,
    description TEXT,
    images TEXT,           -- a JSON array of URLs
    image_results TEXT     -- NULL or a JSON object: url -> [state, ...] (store.record), schema 4
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY,
    product_id TEXT NOT NULL,
    record BLOB,           -- the packed record after the change; NULL: the product was deleted
    owner TEXT             -- a delete: the user_id of what it deleted (the feed's user_id filter)
);
CREATE TABLE IF NOT EXISTS reshard_origins (  -- written by a reshard (productd.store.reshard_history)
    id INTEGER PRIMARY KEY CHECK (id = 1),
    origins BLOB NOT NULL  -- Origins.pack(): the old shards' histories and where each carried change came from
);
"""
_UPGRADE_FROM_1 = """
ALTER TABLE products ADD COLUMN created_at_ns INTEGER;
ALTER TABLE products ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE products ADD COLUMN user_id TEXT;
ALTER TABLE products ADD COLUMN name TEXT;
ALTER TABLE products ADD COLUMN description TEXT;
ALTER TABLE products ADD COLUMN images TEXT;
"""
_UPGRADE_FROM_2 = """
ALTER TABLE changes ADD COLUMN owner TEXT;
"""
_UPGRADE_FROM_3 = """
ALTER TABLE products ADD COLUMN image_results TEXT;
"""
# What brings a file of each earlier schema to this one (schema 1 has no changes table yet:
# _SCHEMA makes it, with the owner column).
_UPGRADES = {1: _UPGRADE_FROM_1 + _UPGRADE_FROM_3, 2: _UPGRADE_FROM_2 + _UPGRADE_FROM_3, 3: _UPGRADE_FROM_3}
_COLUMNS = ("id, price, stock, version, updated_at_ns, created_at_ns, revision, user_id, name, description, images, "
            "image_results")


class StoreFileError(Exception):
    """A shard file cannot be used; the message names it and says why."""


class ShardFile:
    def __init__(self, path: str, *, sync: bool) -> None:
        self.path = path
        self.db = None
        self._checkpointer: _Checkpointer | None = None
        try:
            # A writer that holds the file (an operator's open transaction in the sqlite3 shell)
            # makes a commit wait at most BUSY_TIMEOUT, then fail and be retried: the shard's
            # loop must not stall behind it.
            self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            # Check the version before anything that writes: a newer productd's file stays untouched.
            version = _check_version(self.db, path)
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL fsyncs the WAL at every commit (an acknowledged event survives power loss);
            # NORMAL survives a crash of the process, which is what batch mode promises.
            self.db.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
            if version in _UPGRADES:
                self._upgrade(_UPGRADES[version])
            self.db.executescript(_SCHEMA)
            if version == 0:
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("SELECT count(*) FROM products").fetchone()
        except (sqlite3.DatabaseError, StoreFileError) as exc:
            self._abandon()
            if isinstance(exc, StoreFileError):
                raise
            raise StoreFileError(f"{path} is not a usable productd shard file: {exc}") from exc

    @staticmethod
    def check(path: str) -> None:
        """Open an existing shard file read-only: is it SQLite, and not from a newer productd?

        Changes neither the file nor its WAL. A file without a WAL is opened immutable (no lock,
        no file created). A file that a crash left with a WAL is opened read-only, which reads
        the WAL as SQLite's own recovery would but writes nothing to it: the WAL may hold the
        schema or the user_version, which the file alone does not show yet. That open creates
        the `-shm` wal-index if there was none; the check removes it again.
        """
        wal, shm = path + "-wal", path + "-shm"
        has_wal = os.path.exists(wal)
        had_shm = os.path.exists(shm)
        mode = "mode=ro" if has_wal else "mode=ro&immutable=1"
        try:
            db = sqlite3.connect(f"file:{quote(path)}?{mode}", uri=True)
        except sqlite3.DatabaseError as exc:
            raise StoreFileError(f"{path} cannot be opened: {exc}") from exc
        try:
            _check_version(db, path)
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreFileError(f"{path} is not a usable productd shard file: {exc}") from exc
        finally:
            db.close()
            if has_wal and not had_shm:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(shm)

    def _upgrade(self, script: str) -> None:
        """Bring a file of an earlier schema to this one, in one transaction."""
        db = self.db
        db.execute("BEGIN")
        try:
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _abandon(self) -> None:
        """Drop a connection to a file we refuse, without the checkpoint a normal close does."""
        if self.db is not None:
            try:
                self.db.execute("PRAGMA wal_autocheckpoint=0")
            except sqlite3.DatabaseError:
                pass
            self.db.close()
            self.db = None

    def rows(self) -> Iterator[tuple[str, bytes]]:
        """Every product as (id, packed record)."""
        try:
            for (product_id, price, stock, version, updated_at_ns, created_at_ns, revision,
                 user_id, name, description, images, results) in self.db.execute(f"SELECT {_COLUMNS} FROM products"):
                described = None if user_id is None else (user_id, name, description, tuple(json.loads(images or "[]")),
                                                          json.loads(results) if results else None)
                yield product_id, pack_fields(price, stock, version, updated_at_ns, created_at_ns, revision, described)
        except (sqlite3.DatabaseError, ValueError) as exc:
            raise StoreFileError(f"{self.path} is corrupt: {exc}") from exc

    def changes(self, keep: int) -> tuple[list[tuple[int, str, bytes | None]], dict[int, str]]:
        """The last `keep` changes, oldest first, as (seq, product id, packed record or None), and
        the owners of what the deletes among them deleted, by seq."""
        try:
            rows = self.db.execute(
                "SELECT seq, product_id, record, owner FROM changes ORDER BY seq DESC LIMIT ?", (keep,)
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreFileError(f"{self.path} is corrupt: {exc}") from exc
        rows.reverse()
        return [row[:3] for row in rows], {row[0]: row[3] for row in rows if row[3] is not None}

    def origins(self) -> bytes | None:
        """What a reshard recorded of the history it carried here (None: this file was not made by one)."""
        row = self.db.execute("SELECT origins FROM reshard_origins").fetchone()
        return row[0] if row else None

    def save_origins(self, data: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO reshard_origins VALUES (1, ?)", (data,))

    def max_revision(self) -> int:
        return self.db.execute("SELECT coalesce(max(revision), 0) FROM products").fetchone()[0]

    def save(
        self,
        records: list[tuple[str, bytes | None]],
        changes: Iterable[tuple[int, str, bytes | None]] = (),
        forget_through: int = 0,
        owners: dict[int, str] | None = None,
    ) -> int:
        """In one transaction: write these records (None: delete the product), add these
        changes (with `owners`: the owner of each delete's product, by seq) and drop the changes
        up to `forget_through`. Returns how many records. Raises sqlite3.Error."""
        # In key order: measured on 1,000 random products of a 250,000-product file, 9.3 ms a
        # commit against 11.3 unsorted (checkpoints aside).
        rows = sorted((product_id, *columns(packed)) for product_id, packed in records if packed is not None)
        gone = [(product_id,) for product_id, packed in records if packed is None]
        db = self.db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT OR REPLACE INTO products VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if gone:
                db.executemany("DELETE FROM products WHERE id = ?", gone)
            owned = owners or {}
            db.executemany("INSERT OR REPLACE INTO changes VALUES (?, ?, ?, ?)",
                           [(seq, product_id, packed, None if packed is not None else owned.get(seq))
                            for seq, product_id, packed in changes])
            if forget_through > 0:
                db.execute("DELETE FROM changes WHERE seq <= ?", (forget_through,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return len(rows)

    def sync(self) -> None:
        """Make every commit so far durable, also with synchronous=NORMAL: a full checkpoint
        syncs the WAL and copies it into the file."""
        self.db.execute("PRAGMA wal_checkpoint(FULL)").fetchone()

    def start_checkpointer(self) -> None:
        """Fold the WAL into the file from a thread of its own from now on, not inside commits."""
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer = _Checkpointer(self.path)
        self._checkpointer.start()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.db.close()  # the last connection: SQLite checkpoints and removes the WAL


class _Checkpointer(threading.Thread):
    """Passive checkpoints on a connection of its own: they never block the shard's commits, and
    SQLite lets go of the GIL while it copies and syncs pages."""

    def __init__(self, path: str) -> None:
        super().__init__(name="checkpointer", daemon=True)
        self.path = path
        self._halt = threading.Event()

    def run(self) -> None:
        wal = self.path + "-wal"
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        failing = False
        try:
            while not self._halt.wait(CHECKPOINT_EVERY):
                try:
                    size = os.path.getsize(wal)
                    if size < CHECKPOINT_WAL_BYTES:
                        continue
                    # A passive checkpoint never waits for the shard's commits, but under commits
                    # that never pause it may never finish the WAL, which then grows: past
                    # CHECKPOINT_FORCE_BYTES the next commit waits for a RESTART, which lets the
                    # WAL start over.
                    mode = "RESTART" if size >= CHECKPOINT_FORCE_BYTES else "PASSIVE"
                    db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                    failing = False
                except FileNotFoundError:
                    continue
                except sqlite3.Error as exc:  # a full disk: the WAL keeps the commits, try again later
                    if not failing:
                        log.warning("checkpoint of %s failed: %s; the WAL grows until one succeeds", self.path, exc)
                    failing = True
        finally:
            db.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _check_version(db: sqlite3.Connection, path: str) -> int:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreFileError(
            f"{path} has schema version {version}, newer than this productd understands "
            f"({SCHEMA_VERSION}); run a newer productd or restore a backup"
        )
    return version


