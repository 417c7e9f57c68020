"""The multi-host mode's start: is the configuration usable? (`productd serve --broker ...`)

Before anything forks, the supervisor checks that the database answers and holds this cluster's
schema and layout, and that the broker answers and has (or now gets) one queue per shard with
this configuration's arguments. Anything wrong is one clear message and exit code 2, with
nothing written. (Declaring a missing queue is not a write of state: it is what the first
owner would do.)

The checks run in a forked child: the supervisor must fork its processes before it ever
starts a thread, and the clients may start one (name resolution in an executor).
"""

from __future__ import annotations

import asyncio
import os

from productd.cluster import broker, pgstore


class ClusterConfigError(Exception):
    """The cluster cannot be used as configured; the message says why and what to do."""


def check(settings) -> int:
    """The cluster's shard count, once the database and the broker are found usable."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the checks, report on the pipe, exit
        os.close(read_fd)
        code = 0
        try:
            message = str(_check(settings))
        except ClusterConfigError as exc:
            message, code = f"error {exc}", 2
        except BaseException as exc:  # anything unexpected is a failed check too, never a hang
            message, code = f"error {type(exc).__name__}: {exc}", 2
        os.write(write_fd, message.encode()[:60000])
        os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    answer = b"".join(chunks).decode()
    if not answer or answer.startswith("error "):
        raise ClusterConfigError(answer[6:] or "the cluster check died without a word")
    return int(answer)


def _check(settings) -> int:
    import psycopg

    if not settings.database:
        raise ClusterConfigError("--broker needs --database (the cluster's PostgreSQL, created with productd migrate)")
    if settings.durability == "none":
        raise ClusterConfigError("--durability none is for one host: a cluster keeps its state in PostgreSQL "
                                 "(use batch or sync)")
    if settings.owner_index >= settings.owner_hosts:
        raise ClusterConfigError(f"--owner-index {settings.owner_index} must be below --owner-hosts "
                                 f"{settings.owner_hosts}")
    try:
        with psycopg.connect(settings.database, autocommit=True, connect_timeout=10) as conn:
            shards = settings.shards
            if shards is None:
                shards = _recorded_shards(conn)
            pgstore.check(conn, shards, settings.cluster)
    except psycopg.Error as exc:
        raise ClusterConfigError(f"database {_safe(settings.database)}: {str(exc).strip()}") from None
    except pgstore.DatabaseError as exc:
        raise ClusterConfigError(f"database {_safe(settings.database)}: {exc}") from None
    asyncio.run(_declare(settings, shards))
    return shards


def _recorded_shards(conn) -> int:
    try:
        row = conn.execute("SELECT shards FROM cluster").fetchone()
    except Exception:
        row = None
    if row is None:
        raise ClusterConfigError("the database holds no productd cluster: run productd migrate first")
    return row[0]


async def _declare(settings, shards: int) -> None:
    import aio_pika
    from aiormq.exceptions import ChannelPreconditionFailed

    try:
        connection = await aio_pika.connect(settings.broker, timeout=10)
    except Exception as exc:  # refused, unknown host, bad credentials, a timeout: all say why
        raise ClusterConfigError(f"broker {_safe(settings.broker)}: {type(exc).__name__}: {exc}") from None
    try:
        for shard in range(shards):
            channel = await connection.channel()
            try:
                await broker.declare(channel, settings.cluster, shard, settings.queue_length)
            except ChannelPreconditionFailed as exc:
                raise ClusterConfigError(
                    f"queue {broker.queue_name(settings.cluster, shard)} exists with other arguments ({exc}); "
                    "give every host of the cluster the same --queue-length"
                ) from None
            await channel.close()
    finally:
        await connection.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return url
