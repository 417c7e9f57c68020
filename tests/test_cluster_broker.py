"""productd.cluster.broker against the real RabbitMQ on this machine (PRODUCTD_TEST_BROKER,
default amqp://guest:guest@127.0.0.1:5672/): confirms, backpressure, single active consumer,
takeover in order. Each test uses queues of its own cluster name and deletes them after."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

pytest.importorskip("aio_pika", reason="the cluster extra is not installed: pip install 'productd[cluster]'")
import aio_pika  # noqa: E402

from productd.cluster import broker  # noqa: E402

URL = os.environ.get("PRODUCTD_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672/")
DEADLINE = 30.0  # seconds: only so that a hang fails


async def _reachable() -> str | None:
    try:
        connection = await asyncio.wait_for(aio_pika.connect(URL), 10)
    except Exception as exc:  # any failure to connect means: skip, with the reason
        return f"{type(exc).__name__}: {exc}"
    await connection.close()
    return None


_why = asyncio.run(_reachable())
if _why is not None:
    pytest.skip(f"RabbitMQ at {URL} does not answer ({_why}); start it with `rabbitmq-server -detached`",
                allow_module_level=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, DEADLINE))


class Cluster:
    """A unique cluster name, its connections, and the queues to delete at the end."""

    def __init__(self) -> None:
        self.name = f"test-{uuid.uuid4().hex[:12]}"
        self.connections: list[aio_pika.abc.AbstractConnection] = []

    async def connect(self) -> aio_pika.abc.AbstractConnection:
        connection = await aio_pika.connect(URL)
        self.connections.append(connection)
        return connection

    async def cleanup(self, shards: int) -> None:
        for connection in self.connections:
            if not connection.is_closed:
                await connection.close()
        async with await aio_pika.connect(URL) as connection:
            channel = await connection.channel()
            for shard in range(shards):
                await channel.queue_delete(broker.queue_name(self.name, shard))


def scenario(shards: int = 1):
    """Decorate an async test taking a Cluster: run it, then delete its queues whatever happened."""
    def wrap(test):
        def runner():
            cluster = Cluster()

            async def body():
                try:
                    await test(cluster)
                finally:
                    await cluster.cleanup(shards)

            run(body())
        runner.__name__ = test.__name__
        return runner
    return wrap


async def _drain(consumer: broker.Consumer, count: int) -> list[bytes]:
    got: list = []
    while len(got) < count:
        got += await consumer.batch(count - len(got))
    return got


@scenario()
async def test_publish_is_confirmed_and_consumed_in_order(cluster):
    connection = await cluster.connect()
    consumer = await broker.Consumer.open(connection, cluster.name, 0, max_length=100, prefetch=50)
    publisher = await broker.Publisher.open(connection, cluster.name)
    assert all([await publisher.publish(0, f"m{i}".encode()) for i in range(20)])
    messages = await _drain(consumer, 20)
    assert [m.body for m in messages] == [f"m{i}".encode() for i in range(20)]
    await consumer.commit(messages)
    assert await consumer.batch(10, timeout=0.5) == []


@scenario()
async def test_the_queue_is_a_quorum_queue_with_single_active_consumer(cluster):
    connection = await cluster.connect()
    channel = await connection.channel()
    await broker.declare(channel, cluster.name, 0, max_length=7)
    # Declaring it again with other arguments is refused: the arguments are what we think they are.
    other = await connection.channel()
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        await other.declare_queue(broker.queue_name(cluster.name, 0), durable=True,
                                  arguments={**broker.queue_arguments(7), "x-single-active-consumer": False})
    again = await connection.channel()
    await broker.declare(again, cluster.name, 0, max_length=7)  # the same arguments: fine


@scenario()
async def test_a_full_queue_nacks_the_publish(cluster):
    connection = await cluster.connect()
    channel = await connection.channel()
    await broker.declare(channel, cluster.name, 0, max_length=5)
    publisher = await broker.Publisher.open(connection, cluster.name)
    answers = [await publisher.publish(0, f"m{i}".encode()) for i in range(12)]
    assert answers[:5] == [True] * 5
    assert answers[-1] is False, answers  # full: refused, so the front end can answer 503
    accepted = answers.count(True)
    queue = await channel.declare_queue(broker.queue_name(cluster.name, 0), passive=True)
    assert queue.declaration_result.message_count == accepted
    # Once a consumer takes some, the queue accepts again.
    consumer = await broker.Consumer.open(connection, cluster.name, 0, max_length=5, prefetch=100)
    await consumer.commit(await _drain(consumer, accepted))
    assert await publisher.publish(0, b"after") is True


@scenario()
async def test_unroutable_publish_raises_queue_missing(cluster):
    publisher = await broker.Publisher.open(await cluster.connect(), cluster.name)
    with pytest.raises(broker.QueueMissing, match=cluster.name):
        await publisher.publish(0, b"nowhere")


@scenario()
async def test_one_active_consumer_and_takeover_from_the_first_unacknowledged(cluster):
    owner_a, owner_b = await cluster.connect(), await cluster.connect()
    a = await broker.Consumer.open(owner_a, cluster.name, 0, max_length=1000, prefetch=100)
    b = await broker.Consumer.open(owner_b, cluster.name, 0, max_length=1000, prefetch=100)
    publisher = await broker.Publisher.open(await cluster.connect(), cluster.name)
    bodies = [f"m{i}".encode() for i in range(30)]
    assert all([await publisher.publish(0, body) for body in bodies])
    got_a = await _drain(a, 30)
    assert [m.body for m in got_a] == bodies
    assert await b.batch(10, timeout=1.0) == [] and not b.active.is_set()  # single active: b gets nothing
    await a.commit(got_a[:10])  # a committed the first 10, then dies with 20 unacknowledged
    await owner_a.close()
    got_b = await _drain(b, 20)
    assert [m.body for m in got_b] == bodies[10:]  # in order, from the first unacknowledged
    assert all(m.redelivered for m in got_b)
    assert await publisher.publish(0, b"later") is True
    later = await _drain(b, 1)
    assert later[0].body == b"later"
    await b.commit(later)


@scenario()
async def test_closing_the_channel_hands_over_one_shard_and_keeps_order(cluster):
    owner_a, owner_b = await cluster.connect(), await cluster.connect()
    a = await broker.Consumer.open(owner_a, cluster.name, 0, max_length=1000, prefetch=5)
    b = await broker.Consumer.open(owner_b, cluster.name, 0, max_length=1000, prefetch=5)
    publisher = await broker.Publisher.open(await cluster.connect(), cluster.name)
    bodies = [f"m{i}".encode() for i in range(12)]
    assert all([await publisher.publish(0, body) for body in bodies])
    first = await _drain(a, 5)  # prefetch 5: the rest wait in the queue
    assert [m.body for m in first] == bodies[:5]
    await a.commit(first[:2])
    await a.close()  # its channel only: the connection stays, as an owner that hands over one shard
    assert not owner_a.is_closed
    got_b = []
    while len(got_b) < 10:
        batch = await b.batch(10)
        got_b += batch
        await b.commit(batch)
    assert [m.body for m in got_b] == bodies[2:]
