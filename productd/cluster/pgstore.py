"""The shards' state in PostgreSQL: products, who owns each shard, and the schema's version.

One database (or one schema of it, through `search_path`) holds one productd cluster: its
shard count is recorded at creation in the `cluster` row and never changes (reshard offline).

Fencing. The broker's single active consumer does not stop an old owner that is still working
on messages it received before it lost its shard (a paused or cut-off host). So an owner takes
shard K by incrementing K's epoch (`take`), and every batch it writes (`save`) first updates its
`shard_owners` row *where the epoch is still its own*: no row means another owner took the shard,
and the transaction writes nothing (`Fenced`). The row lock that update takes also orders a save
against a concurrent `take`: a save that got the lock first commits before the take; one that
waits re-reads the row after the take and finds the epoch changed.

The upsert's guard is the revision, not the event version: see `save`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import psycopg

from productd.store.record import NO_DETAILS_COLUMNS, columns, pack_fields

# Each step brings the schema from version i to i + 1; a step is never edited once released,
# only followed by a new one.
MIGRATIONS: tuple[str, ...] = (
    # 1: the cluster's layout, the products, the shard owners
    """
    CREATE TABLE cluster (
        id integer PRIMARY KEY CHECK (id = 1),
        name text NOT NULL,
        shards integer NOT NULL CHECK (shards > 0),
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE products (
        shard integer NOT NULL,
        product_id text NOT NULL,
        price double precision,   -- NULL: never set
        stock bigint,             -- NULL: never set
        version bigint,           -- NULL: never set
        updated_at_ns bigint NOT NULL,
        created_at_ns bigint NOT NULL,
        revision bigint NOT NULL, -- the shard's change sequence number of the product's last change
        user_id text,             -- NULL for a bare product (events only), with name, description, images
        name text,
        description text,
        images jsonb,             -- a JSON array of URLs
        image_results jsonb,      -- NULL or url -> [state, ...] (productd.store.record), as sqlite.py
        deleted boolean NOT NULL DEFAULT false, -- a tombstone: its revision still guards (see PgStore.save)
        PRIMARY KEY (shard, product_id)
    );
    CREATE TABLE shard_owners (
        shard integer PRIMARY KEY,
        epoch bigint NOT NULL DEFAULT 0, -- the fencing token: +1 at every take
        owner text,                      -- who took it last (host:pid), for /readyz and operators
        taken_at timestamptz,
        seq bigint NOT NULL DEFAULT 0,   -- the shard's change counter after its last saved batch
        saved_at timestamptz
    );
    """,
    # 2: what the active owner reports of each shard (/readyz, /metrics on any front end), and
    # the preferred owner host's wait for its shard (productd.cluster.owner, "Spreading")
    """
    ALTER TABLE shard_owners
        ADD COLUMN seen_at timestamptz,       -- the active owner's last heartbeat
        ADD COLUMN preferred_at timestamptz,  -- the shard's preferred owner host last said it waits for it
        ADD COLUMN products bigint NOT NULL DEFAULT 0,
        ADD COLUMN batches bigint NOT NULL DEFAULT 0,        -- batches saved, by every owner
        ADD COLUMN batch_records bigint NOT NULL DEFAULT 0,  -- products written by them
        ADD COLUMN commit_seconds double precision NOT NULL DEFAULT 0;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_LOCK = 0x70726F64  # "prod": one migration at a time per database (pg_advisory_xact_lock)
_COLUMNS = ("product_id, price, stock, version, updated_at_ns, created_at_ns, revision, "
            "user_id, name, description, images, image_results")


class DatabaseError(Exception):
    """The database cannot be used by this productd; the message says why and what to do."""


class SchemaTooNew(DatabaseError):
    pass


class LayoutMismatch(DatabaseError):
    pass


class Fenced(Exception):
    """Another owner has taken the shard since this owner's epoch: nothing was written."""

    def __init__(self, shard: int, epoch: int) -> None:
        super().__init__(f"shard {shard}: epoch {epoch} is no longer the owner's; another owner has taken the shard")
        self.shard = shard
        self.epoch = epoch


def connect(url: str) -> psycopg.Connection:
    """A connection in autocommit mode: every transaction of this module is an explicit block."""
    return psycopg.connect(url, autocommit=True)


def _version(conn: psycopg.Connection) -> int:
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def _too_new(version: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"the database has productd schema version {version}, newer than this productd understands "
        f"({SCHEMA_VERSION}); run a newer productd"
    )


def _check_layout(conn: psycopg.Connection, shards: int, name: str) -> None:
    row = conn.execute("SELECT name, shards FROM cluster").fetchone()
    if row is None:
        raise DatabaseError("the database has productd's tables but no cluster row: not made by productd migrate")
    if tuple(row) != (name, shards):
        raise LayoutMismatch(
            f"the database holds productd cluster {row[0]!r} with {row[1]} shards, not {name!r} with {shards}: "
            "point --database at that cluster's database, or use its name and shard count (reshard offline)"
        )


def migrate(conn: psycopg.Connection, shards: int, name: str = "default") -> tuple[int, int]:
    """Apply the missing migration steps and record the layout on a fresh database, in one
    transaction. Returns (version before, version after). Refuses a newer schema and another
    layout without writing anything."""
    with conn.transaction():
        # Two hosts starting at once: the second waits here and then finds nothing to do.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                     "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        before = _version(conn)
        if before > SCHEMA_VERSION:
            raise _too_new(before)
        for number in range(before + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[number - 1])
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
        if before == 0:
            conn.execute("INSERT INTO cluster (id, name, shards) VALUES (1, %s, %s)", (name, shards))
            conn.execute("INSERT INTO shard_owners (shard) SELECT generate_series(0, %s - 1)", (shards,))
        _check_layout(conn, shards, name)
    return before, SCHEMA_VERSION


def check(conn: psycopg.Connection, shards: int, name: str = "default") -> None:
    """Is this database ready for this productd, unchanged? (An owner's start: it never migrates.)"""
    version = _version(conn)
    if version > SCHEMA_VERSION:
        raise _too_new(version)
    if version < SCHEMA_VERSION:
        raise DatabaseError(
            f"the database has productd schema version {version}, this productd needs {SCHEMA_VERSION}: "
            "run productd migrate first"
        )
    _check_layout(conn, shards, name)


_TOMBSTONE = (None, None, None, 0, 0)  # price, stock, version, updated_at_ns, created_at_ns of a deleted product


class PgStore:
    """The shards of one cluster in one PostgreSQL database, on one connection (not shared
    between threads: psycopg serialises a connection's statements anyway)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def take(self, shard: int, owner: str) -> int:
        """Become shard's owner: its new epoch, which every later save must show."""
        row = self.conn.execute(
            "UPDATE shard_owners SET epoch = epoch + 1, owner = %s, taken_at = now() WHERE shard = %s RETURNING epoch",
            (owner, shard),
        ).fetchone()
        if row is None:
            raise DatabaseError(f"shard {shard} is not a shard of this cluster")
        return row[0]

    def owners(self) -> list[tuple[int, int, str | None]]:
        """(shard, epoch, owner) for every shard: who owns what, for /readyz and metrics."""
        return [tuple(r) for r in self.conn.execute("SELECT shard, epoch, owner FROM shard_owners ORDER BY shard")]

    def beat(self, shard: int, epoch: int, products: int, commit_seconds: float, preferred_wait: float) -> bool:
        """The active owner's heartbeat: raises Fenced when `epoch` no longer owns the shard;
        True when the shard's preferred owner host said within `preferred_wait` seconds that it
        waits for it (this owner should hand the shard over)."""
        row = self.conn.execute(
            "UPDATE shard_owners SET seen_at = now(), products = %s, commit_seconds = commit_seconds + %s "
            "WHERE shard = %s AND epoch = %s "
            "RETURNING coalesce(preferred_at > now() - make_interval(secs => %s), false)",
            (products, commit_seconds, shard, epoch, preferred_wait),
        ).fetchone()
        if row is None:
            raise Fenced(shard, epoch)
        return row[0]

    def wait_for(self, shard: int) -> None:
        """The shard's preferred owner host, subscribed and not active, says it waits for it."""
        self.conn.execute("UPDATE shard_owners SET preferred_at = now() WHERE shard = %s", (shard,))

    def status(self) -> list[tuple]:
        """(shard, epoch, owner, seconds since its owner's heartbeat or None, products, batches,
        batch records, commit seconds) for every shard: /readyz and /metrics of a front end."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT shard, epoch, owner, extract(epoch FROM now() - seen_at)::float8, products, batches, "
            "batch_records, commit_seconds FROM shard_owners ORDER BY shard")]

    def head(self, shard: int) -> int:
        """The shard's change counter after its last saved batch: where a new owner goes on
        numbering (products alone cannot say, when the last change was a delete)."""
        row = self.conn.execute(
            "SELECT greatest(o.seq, coalesce((SELECT max(revision) FROM products p WHERE p.shard = o.shard), 0)) "
            "FROM shard_owners o WHERE o.shard = %s", (shard,)
        ).fetchone()
        return row[0]

    def save(self, shard: int, epoch: int, records: Iterable[tuple[str, bytes | None]], seq: int | None = None) -> int:
        """Write a batch of the shard's products (packed record, or None: deleted) in one
        transaction, if `epoch` still owns the shard; raise Fenced and write nothing if not.

        `seq` is the shard's change counter after the batch (default: the highest revision in
        it). A key that appears more than once counts as its last record (PostgreSQL refuses an
        upsert that touches one row twice).

        The guard is the revision: an upsert replaces a stored row only when its revision is
        higher, and a delete removes it only when the stored revision is <= `seq`. The event
        version (record.merge's rule) cannot serve: an event without a version and every
        catalogue write keep the version, so `excluded.version > products.version` would drop
        them, and merge has already been applied by the owner, whose record is the result. The
        revision is the shard's change number, one counter for every kind of change, carried
        over from owner to owner (`head`): a higher revision is a later state. With fencing, the
        guard only matters when one owner's batches arrive out of order or twice (a retry
        after a commit whose answer was lost): then the older one changes nothing.

        A delete leaves a tombstone (`deleted`, revision `seq`) rather than no row: without it,
        an older upsert arriving after the delete would bring the product back (the brute-force
        test found that). `seq` is at least the delete's own revision and below every later
        change's, so the tombstone loses to later changes and beats earlier ones. `load` skips
        tombstones; an owner may purge them once no older batch can arrive (not built yet).
        Returns how many records the batch held after deduplication.
        """
        latest: dict[str, bytes | None] = {}
        for product_id, packed in records:
            latest.pop(product_id, None)  # last wins, and goes to the end
            latest[product_id] = packed
        rows = [(product_id, *columns(packed), False)
                for product_id, packed in latest.items() if packed is not None]
        if seq is None:
            seq = max((row[6] for row in rows), default=0)
        rows += [(product_id, *_TOMBSTONE, seq, *NO_DETAILS_COLUMNS, True)
                 for product_id, packed in latest.items() if packed is None]
        conn = self.conn
        with conn.transaction():
            fenced = conn.execute(
                "UPDATE shard_owners SET seq = greatest(seq, %s), saved_at = now(), batches = batches + 1, "
                "batch_records = batch_records + %s WHERE shard = %s AND epoch = %s",
                (seq, len(latest), shard, epoch),
            ).rowcount == 0
            if fenced:
                raise Fenced(shard, epoch)  # leaving the block rolls back: nothing written
            if rows:
                self._upsert(shard, rows)
        return len(latest)

    def _upsert(self, shard: int, rows: list[tuple]) -> None:
        # COPY into a temporary table, then one INSERT ... SELECT: measured (bench/cluster_pg.py,
        # docs/cluster.md) twice as fast as psycopg's pipelined executemany of the same upsert,
        # for batches of 1,000 and of 10,000.
        conn = self.conn
        conn.execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS productd_incoming ("
            "product_id text, price double precision, stock bigint, version bigint, updated_at_ns bigint, "
            "created_at_ns bigint, revision bigint, user_id text, name text, description text, images jsonb, "
            "image_results jsonb, deleted boolean"
            ") ON COMMIT DELETE ROWS"
        )
        with conn.cursor().copy(f"COPY productd_incoming ({_COLUMNS}, deleted) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.execute(
            f"INSERT INTO products (shard, {_COLUMNS}, deleted) SELECT %s, {_COLUMNS}, deleted FROM productd_incoming "
            "ON CONFLICT (shard, product_id) DO UPDATE SET "
            "price = excluded.price, stock = excluded.stock, version = excluded.version, "
            "updated_at_ns = excluded.updated_at_ns, created_at_ns = excluded.created_at_ns, "
            "revision = excluded.revision, user_id = excluded.user_id, name = excluded.name, "
            "description = excluded.description, images = excluded.images, image_results = excluded.image_results, "
            "deleted = excluded.deleted "
            "WHERE excluded.revision > products.revision",
            (shard,),
        )

    def load(self, shard: int, batch: int = 10_000) -> Iterator[tuple[str, bytes]]:
        """Every product of the shard as (id, packed record), packed as sqlite.py's rows() does.
        A server-side cursor: a shard of a million products is never in memory twice."""
        with self.conn.transaction(), self.conn.cursor(name=f"productd_load_{shard}") as cursor:
            cursor.itersize = batch
            cursor.execute(f"SELECT {_COLUMNS} FROM products WHERE shard = %s AND NOT deleted", (shard,))
            for (product_id, price, stock, version, updated_at_ns, created_at_ns, revision,
                 user_id, name, description, images, results) in cursor:
                described = None if user_id is None else (user_id, name, description, tuple(images or ()),
                                                          results or None)
                yield product_id, pack_fields(price, stock, version, updated_at_ns, created_at_ns, revision, described)
