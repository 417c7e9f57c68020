"""The shard inboxes on RabbitMQ: one durable quorum queue per shard, one active consumer each.

A shard's queue `productd.<cluster>.shard.<k>` is what the inbox pipe is on one host: a FIFO
that many front ends write and one owner reads. Its arguments:

- `x-queue-type: quorum`: replicated and durable; messages a consumer had not acknowledged go
  back to the queue ahead of newer ones when its channel closes, so the next owner goes on in
  order from the first unacknowledged message;
- `x-single-active-consumer: true`: every owner host subscribes, the broker delivers to one, and
  hands the queue to the next subscriber when that one's channel or connection goes;
- `x-max-length` with `x-overflow: reject-publish`: a full queue nacks the publish, which the
  front end turns into 503 with Retry-After (backpressure, as a full inbox pipe does).

Written on aio-pika (asyncio) because the front end that publishes runs in uvicorn's event loop,
where a blocking client would stall every other request while it waits for a confirm, and
aio-pika's confirms are futures that many requests await at once.
"""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import DeliveryError, PublishError


class QueueMissing(Exception):
    """A publish the broker could not route: the shard's queue does not exist."""


def queue_name(cluster: str, shard: int) -> str:
    return f"productd.{cluster}.shard.{shard}"


def queue_arguments(max_length: int) -> dict:
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-max-length": max_length,
        "x-overflow": "reject-publish",
    }


async def declare(channel: AbstractChannel, cluster: str, shard: int, max_length: int) -> AbstractQueue:
    """Declare (or find, with the same arguments) one shard's queue. Declaring it with other
    arguments than it has fails with PRECONDITION_FAILED and closes the channel."""
    return await channel.declare_queue(queue_name(cluster, shard), durable=True, arguments=queue_arguments(max_length))


class Publisher:
    """A front end's side: publish frames to shard queues and learn whether the broker took them."""

    def __init__(self, channel: AbstractChannel, cluster: str) -> None:
        # The channel must be opened with publisher_confirms=True (aio-pika's default).
        self.channel = channel
        self.cluster = cluster

    @classmethod
    async def open(cls, connection: aio_pika.abc.AbstractConnection, cluster: str) -> Publisher:
        return cls(await connection.channel(publisher_confirms=True, on_return_raises=True), cluster)

    async def publish(self, shard: int, body: bytes, timeout: float | None = None) -> bool:
        """True once the broker has the frame durably (ack); False when it refused it (nack or
        reject: the queue is full). Confirms may arrive out of order across publishes: each
        awaits its own. A lost connection raises; the caller cannot know whether it arrived."""
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await self.channel.default_exchange.publish(
                message, routing_key=queue_name(self.cluster, shard), mandatory=True, timeout=timeout
            )
        except PublishError as exc:  # returned as unroutable: before DeliveryError, its base class
            raise QueueMissing(f"no queue {queue_name(self.cluster, shard)}: has the cluster been created?") from exc
        except DeliveryError:
            return False
        return True


class Consumer:
    """An owner's side of one shard queue: messages in order, acknowledged after the commit.

    Several owners subscribe; the broker delivers to one. `batch()` waits for the next
    messages; `commit(batch)` acknowledges all of them (and everything before) once the caller
    has committed their effects. Messages never acknowledged go back to the queue for the next
    owner when this one's channel closes.
    """

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        self.channel = channel
        self.queue = queue
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: str | None = None
        self.active = asyncio.Event()  # set at the first delivery: this consumer is the active one

    @classmethod
    async def open(
        cls, connection: aio_pika.abc.AbstractConnection, cluster: str, shard: int, max_length: int, prefetch: int
    ) -> Consumer:
        # A channel per shard: closing it hands this shard (and only this one) to the next owner.
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        consumer = cls(channel, await declare(channel, cluster, shard, max_length))
        consumer._tag = await consumer.queue.consume(consumer._deliver, no_ack=False)
        return consumer

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        # aio-pika runs each delivery's callback as a task, in delivery order; putting without
        # awaiting keeps that order.
        self.active.set()
        self._inbox.put_nowait(message)

    async def batch(self, limit: int, timeout: float | None = None) -> list[AbstractIncomingMessage]:
        """The next messages in order, at least one (or none after `timeout` seconds), at most `limit`."""
        try:
            first = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            return []
        messages = [first]
        while len(messages) < limit and not self._inbox.empty():
            messages.append(self._inbox.get_nowait())
        return messages

    async def commit(self, messages: list[AbstractIncomingMessage]) -> None:
        """Acknowledge a batch the caller has committed: one ack with `multiple`, which also
        acknowledges every earlier delivery on this channel (they were all in earlier batches)."""
        if messages:
            await messages[-1].ack(multiple=True)

    async def close(self) -> None:
        """Stop owning the shard: unacknowledged messages go back to the queue, the next owner takes over."""
        if not self.channel.is_closed:
            await self.channel.close()

