"""A shard's change history: every change it applies, numbered in the order it applied them.

The sequence number of a product's last change is also its revision (its ETag): one counter per
shard, never reused, so a revision names one state of one product for good. The history keeps
the last `keep` changes (`--change-history`), for the change feed; with durability on, the
shard commits each change with the products it changed.
"""

from __future__ import annotations

from collections import deque


class ChangeLog:
    """Owned by one shard. `head` is the sequence number of the last change applied."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = 0
        self.entries: deque[tuple[int, str, bytes | None]] = deque(maxlen=keep)  # (seq, product id, record)
        self.unsaved: list[tuple[int, str, bytes | None]] = []  # applied since the last commit

    def append(self, seq: int, product_id: str, packed: bytes | None) -> None:
        """Record a change; `seq` is head + 1, which the caller stamped into the record first.
        `packed` is the product after the change, None for a delete."""
        entry = (seq, product_id, packed)
        self.head = seq
        self.entries.append(entry)
        self.unsaved.append(entry)

    def load(self, rows, max_revision: int) -> None:
        """Start from what the shard file holds: its last changes (oldest first) and the highest
        revision of any product (a reshard brings revisions from other shards)."""
        for entry in rows:
            self.entries.append(entry)
        last = self.entries[-1][0] if self.entries else 0
        self.head = max(last, max_revision)

    def saved(self) -> None:
        self.unsaved.clear()
