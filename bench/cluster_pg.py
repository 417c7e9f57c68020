"""The cluster's building blocks on this machine's PostgreSQL and RabbitMQ (issue 14), briefly.

    python -m bench.cluster_pg            # PRODUCTD_TEST_DATABASE / PRODUCTD_TEST_BROKER, defaults 127.0.0.1

Prints JSON:

- `save`: milliseconds per PgStore.save of a batch of 1,000 and of 10,000 changed products (half
  of them with catalogue details) into a shard that already holds them (the steady state: every
  row an update), median of ROUNDS, next to the same upsert sent as executemany (the alternative
  to COPY into a temporary table);
- `load`: products/s that PgStore.load packs from a shard of LOAD products;
- `publish`: confirmed publishes/s to one shard queue, one at a time and WINDOW in flight.

Everything is made in a schema and queues of its own and dropped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid

import aio_pika

from productd.cluster import broker, pgstore
from productd.store.record import pack_fields

DATABASE = os.environ.get("PRODUCTD_TEST_DATABASE", "postgresql://postgres@127.0.0.1:5432/test")
BROKER = os.environ.get("PRODUCTD_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
ROUNDS = 7
LOAD = 200_000
PUBLISHES = 2_000
WINDOW = 100


def records(n: int, revision: int) -> list[tuple[str, bytes]]:
    return [(f"product-{i:07d}", pack_fields(10.0 + i, i, revision, 1_700_000_000 + revision, 1, revision + i,
                                             ("user-1", f"name {i}", "a description", ("https://x/1.webp",))
                                             if i % 2 else None))
            for i in range(n)]


def executemany_save(store: pgstore.PgStore, shard: int, epoch: int, batch) -> None:
    """The same guarded upsert without COPY: one INSERT per row, pipelined by psycopg."""
    conn = store.conn
    rows = [(shard, product_id, *pgstore._sql_fields(packed)) for product_id, packed in batch]
    with conn.transaction():
        assert conn.execute("UPDATE shard_owners SET saved_at = now() WHERE shard = %s AND epoch = %s",
                            (shard, epoch)).rowcount == 1
        with conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO products (shard, {pgstore._COLUMNS}) VALUES ({', '.join(['%s'] * 12)}) "
                "ON CONFLICT (shard, product_id) DO UPDATE SET price = excluded.price, stock = excluded.stock, "
                "version = excluded.version, updated_at_ns = excluded.updated_at_ns, "
                "created_at_ns = excluded.created_at_ns, revision = excluded.revision, user_id = excluded.user_id, "
                "name = excluded.name, description = excluded.description, images = excluded.images, "
                "deleted = false WHERE excluded.revision > products.revision",
                rows,
            )


def measure_pg() -> dict:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with pgstore.connect(DATABASE) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        with pgstore.connect(DATABASE) as conn:
            conn.execute(f"SET search_path TO {schema}")
            pgstore.migrate(conn, 4, "bench")
            store = pgstore.PgStore(conn)
            out: dict = {"save": {}, "load": {}}
            for n, shard in ((1_000, 0), (10_000, 1)):
                epoch = store.take(shard, "bench")
                for way, save in (("copy", lambda s, e, b: store.save(s, e, b)),
                                  ("executemany", lambda s, e, b: executemany_save(store, s, e, b))):
                    revision = 1_000_000 if way == "copy" else 2_000_000
                    save(shard, epoch, records(n, revision))  # the rows exist: every later save updates them
                    times = []
                    for r in range(ROUNDS):
                        batch = records(n, revision + (r + 1) * 100_000)
                        start = time.perf_counter()
                        save(shard, epoch, batch)
                        times.append((time.perf_counter() - start) * 1000)
                    out["save"][f"{way}_{n}_ms"] = round(statistics.median(times), 1)
            epoch = store.take(2, "bench")
            store.save(2, epoch, records(LOAD, 1))
            start = time.perf_counter()
            count = sum(1 for _ in store.load(2))
            out["load"] = {"products": count, "per_second": round(count / (time.perf_counter() - start))}
            return out
    finally:
        with pgstore.connect(DATABASE) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


async def measure_broker() -> dict:
    cluster = f"bench-{uuid.uuid4().hex[:12]}"
    async with await aio_pika.connect(BROKER) as connection:
        channel = await connection.channel()
        await broker.declare(channel, cluster, 0, max_length=1_000_000)
        publisher = await broker.Publisher.open(connection, cluster)
        body = b"x" * 200
        try:
            start = time.perf_counter()
            for _ in range(PUBLISHES):
                assert await publisher.publish(0, body)
            serial = PUBLISHES / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(PUBLISHES // WINDOW):
                assert all(await asyncio.gather(*(publisher.publish(0, body) for _ in range(WINDOW))))
            windowed = PUBLISHES / (time.perf_counter() - start)
        finally:
            await channel.queue_delete(broker.queue_name(cluster, 0))
    return {"one_at_a_time_per_second": round(serial), f"{WINDOW}_in_flight_per_second": round(windowed)}


def main() -> None:
    result = measure_pg()
    result["publish"] = asyncio.run(measure_broker())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
