"""The change history across a reshard: the old shards' changes carried to the new ones, and
old cursors translated.

A reshard (productd.store.datadir) moves every product to its new owner; this moves every kept
change with it. Each new shard gets the changes of the products it now owns, from all the old
shards, merged by the time they were applied (each old shard's changes stay in their order, so
per-product order holds), and numbered after the highest number any old shard had handed out
(`base`), so every revision a client holds stays below what the new shards number from.

A cursor from before the reshard names one position per old shard. It cannot name one position
per new shard exactly: what it has seen of a new shard's history is a prefix of each old shard's
part in it, interleaved. `Origins.translate` starts each new shard just before the first carried
change the cursor had not seen: nothing unseen is skipped, and some changes it had seen come
again (at least once, in per-product order, each product ending at its newest state). Every
product's revision still only grows, so a client that drops a change whose ETag it has already
seen for that product sees each change once.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import NamedTuple

import msgpack

from productd.store.changes import EXPIRED, LOST, OK, VOID, bytes_to_int, int_to_bytes
from productd.store.record import unpack

FOREIGN = 3  # a Changes status: a cursor of another shard count this shard was not resharded from


class OldShard(NamedTuple):
    """What one old shard's history covered at the reshard."""

    oldest: int  # every change after this was kept (and carried)
    head: int  # the last number it had handed out
    voids: list  # [(low, high)]: numbers strictly between were lost in a crash


class Origins:
    """Held by one new shard: where its carried changes came from (for old cursors)."""

    def __init__(self, old: list[OldShard], carried: list[tuple[int, int, int]], end: int) -> None:
        self.old = old
        self.carried = carried  # (new seq, old shard, old seq), in new seq order
        self.end = end  # the marker after the carried changes: what the new shards did follows it

    def pack(self) -> bytes:
        return msgpack.packb([[list(o) for o in self.old], self.carried, self.end], use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> Origins:
        old, carried, end = msgpack.unpackb(data, use_list=True)
        return cls([OldShard(a, b, [tuple(v) for v in c]) for a, b, c in old], [tuple(c) for c in carried], end)

    def translate(self, heads: list[int]) -> tuple[int, int]:
        """(status, after) for an old cursor `heads`: `after` is where this shard's changes start
        for it. A cursor that had seen every carried change goes on after them (`end`)."""
        if len(heads) != len(self.old):
            return FOREIGN, 0
        for head, old in zip(heads, self.old, strict=True):
            if head > old.head or any(low < head < high for low, high in old.voids):
                return LOST, 0
            if head < old.oldest:
                return EXPIRED, 0
        for seq, shard, old_seq in self.carried:
            if old_seq > heads[shard]:
                return OK, seq - 1
        return OK, self.end


def old_shard(changes: list[tuple[int, str, bytes | None]], max_revision: int) -> OldShard:
    """What an old shard's history (oldest first, as its file holds it) covers."""
    head = max(changes[-1][0] if changes else 0, max_revision)
    oldest = changes[0][0] - 1 if changes else head
    voids = [(bytes_to_int(packed), seq) for seq, product_id, packed in changes if product_id == VOID]
    return OldShard(oldest, head, voids)


class Carried(NamedTuple):
    """What one new shard gets: its changes numbered from base + 1 and a marker after them (an
    empty void: the history of a shard that got no change still holds where it starts), the
    (new seq, old shard, old seq) of each change, and the owners of what its deletes deleted."""

    changes: list[tuple[int, str, bytes | None]]
    origins: list[tuple[int, int, int]]
    owners: dict[int, str]

    @property
    def end(self) -> int:
        return self.changes[-1][0]


def carry(histories: list[list[tuple[int, str, bytes | None]]], owners: list[dict[int, str]], base: int,
          new: int, route: Callable[[str, int], int]) -> list[Carried]:
    """Split the old shards' histories (and their deletes' owners) over `new` shards."""
    out = [Carried([], [], {}) for _ in range(new)]
    numbers = [base] * new
    for _, old, seq, product_id, packed in heapq.merge(*(_timed(i, h) for i, h in enumerate(histories))):
        target = route(product_id, new)
        numbers[target] += 1
        number = numbers[target]
        out[target].changes.append((number, product_id, packed))
        out[target].origins.append((number, old, seq))
        if packed is None and seq in owners[old]:
            out[target].owners[number] = owners[old][seq]
    for target, part in enumerate(out):
        end = numbers[target] + 1
        part.changes.append((end, VOID, int_to_bytes(end)))
    return out


def _timed(old: int, history):
    """One old shard's changes as (applied at, old shard, seq, product id, record), in its order.
    A delete has no record: it takes the time of the change before it, so it keeps its place.
    heapq.merge only compares the heads of its inputs, so each input keeps its own order."""
    at = 0
    for seq, product_id, packed in history:
        if product_id == VOID:
            continue
        if packed is not None:
            at = max(at, unpack(packed).updated_at_ns)
        yield at, old, seq, product_id, packed
